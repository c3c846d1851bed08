"""LoRA adapters: PEFT adapters as merge inputs, merges written as PEFT adapters, adapters extracted
from full fine-tunes.

The shared vocabulary is :class:`mergelab.lora.factors.LoraFactors` (one module's A, B and scaling).
"""

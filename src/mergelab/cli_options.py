"""Command-line options that several commands declare the same way (typer ``Annotated`` aliases).

A command module writes ``threads: Threads = None`` instead of spelling out the option; an option
whose help differs for one command (``--force`` of ``mergelab merge``, of a state folder) keeps its
own declaration there.
"""

from __future__ import annotations

from typing import Annotated

import typer

Force = Annotated[bool, typer.Option("--force", help="replace OUT if it holds a previous mergelab output")]
ForceAny = Annotated[bool, typer.Option("--force-any", help="replace OUT whatever folder it is")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")]
Threads = Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's)")]
MaxShardSize = Annotated[str, typer.Option(help="largest output shard, e.g. 2GB, 500MB")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]

"""Independent reference implementations for the method tests (never imported by ``src``).

Straight from the papers, in float64 where it matters, with full sorts and explicit loops: slow
and obviously right, so the tests pin the methods' maths against them, not against the code
under test.
"""

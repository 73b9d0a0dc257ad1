"""What the tests and the `check` command compare against: the fused operators written
the plain way (reference.py), sharing no code with the operators they judge."""
from . import reference

__all__ = ["reference"]

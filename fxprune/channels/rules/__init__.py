"""Built-in op rules. Importing this package registers them all."""
from . import attention, basic, elementwise, index, layers, norms, reduce, shape, spatial  # noqa: F401

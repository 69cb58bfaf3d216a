"""Built-in op rules. Importing this package registers them all."""
from . import attention, basic, conv_transpose, elementwise, experts, index, layers, norms, reduce, shape, spatial  # noqa: F401

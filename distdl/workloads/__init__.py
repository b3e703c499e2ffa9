"""Built-in workloads; importing this package registers them."""

from distdl.workloads import bert_pretrain  # noqa: F401
from distdl.workloads import glue  # noqa: F401
from distdl.workloads import resnet  # noqa: F401
from distdl.workloads import gan  # noqa: F401

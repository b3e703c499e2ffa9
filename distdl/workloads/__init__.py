"""Built-in workloads; importing this package registers them."""

from distdl.workloads import (
    bert_pretrain,  # noqa: F401
    gan,  # noqa: F401
    glue,  # noqa: F401
    resnet,  # noqa: F401
)

"""What client and server agree on, each defined once and torch-free (the server distribution imports it from
here): the records that cross the wire (``records``), the API's error types and their names (``errors``),
adapter id syntax (``ids``) and the ``ptserve train --out`` folder layout (``layout``)."""

from ptserve.client.wire.ids import NAME_RE, TENANT_RE, AdapterId, check_tenant
from ptserve.client.wire.layout import (
    BLOB_FILE,
    LABELS_FILE,
    PEFT_CONFIG_FILE,
    PEFT_DIR,
    PEFT_WEIGHTS_FILE,
    RECORD_FILE,
)
from ptserve.client.wire.records import AdapterInfo, AdapterPage, Record

__all__ = [
    "AdapterId",
    "AdapterInfo",
    "AdapterPage",
    "BLOB_FILE",
    "LABELS_FILE",
    "NAME_RE",
    "PEFT_CONFIG_FILE",
    "PEFT_DIR",
    "PEFT_WEIGHTS_FILE",
    "RECORD_FILE",
    "Record",
    "TENANT_RE",
    "check_tenant",
]

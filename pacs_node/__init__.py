"""pacs_node: a DICOM Storage SCP that queues CT series, denoises them and forwards the result."""

__version__ = "0.1.0"

"""usbmirror firmware: SCSI target, flash journal, volumes, journey link, local and remote units."""

__version__ = "0.1.0"

"""The USB side of a local unit: descriptors, Bulk-Only Transport, USB/IP server, FunctionFS/configfs.

Nothing here knows about mirroring; it drives a `firmware.logical_unit.LogicalUnit`.
"""

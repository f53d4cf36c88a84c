"""The USB side of a local unit: descriptors, Bulk-Only Transport, USB/IP server, FunctionFS/configfs.

Nothing here knows about mirroring; it drives a `gadget.logical_unit.LogicalUnit`.
"""

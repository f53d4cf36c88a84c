"""iSCSI target (RFC 7143) over the same SCSI target the USB transports use.

`pdu` frames PDUs, `params` negotiates the operational keys, `connection` is the sans-IO state
machine of one connection, `server` is the socket adapter that runs connections and calls the
SCSI target.
"""

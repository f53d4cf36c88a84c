"""The replication core, sans-IO: the source session and the target session of the journey link.

`firmware.replication.source.SourceSession` is what a source (the local unit; later a promoted
remote or the forwarding half of a relay) knows about one remote: positions, window, acknowledgements,
the resync plan, heartbeats and the dead-link timeout, with `now` passed in.
`firmware.replication.target.TargetSession` is what a target (a remote unit's copy of one source;
later the receiving half of a relay) knows: hello checks, the order of applies, the durable position
and the resync state. Both take events and return actions; neither opens a socket or a file, starts a
thread or reads a clock. The drivers are `firmware.replicator` (source) and `firmware.remote_unit`
(target); `firmware.replication.spec.RemoteSpec` is the one definition of a configured remote.
"""

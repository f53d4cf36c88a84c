"""Roles of a source's copies: data generations, switchover, failback and split brain.

`generations` is the sans-IO decision logic (who is newer, what a resync moves); `state` keeps each
side's generation history, role and per-peer bitmaps in its state directory, crash-safely.
"""

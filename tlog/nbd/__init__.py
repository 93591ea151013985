"""Serving a vdisk over NBD with nbdkit, every write logged through the tlog client.

- `tlog.nbd.disk`: `LoggedDisk`, the block logic (read-modify-write, log before write,
  trim and zero as deletes, FLUSH/FUA waiting for FlushOK, EIO on timeouts).
- `tlog.nbd.backend`: where the blocks live (an image file, or the Redis block store).
- `tlog.nbd.settings`: the export's settings, shared by ``tlog nbd`` and the plugin.
- `tlog.nbd.plugin`: the nbdkit Python plugin script.

``tlog nbd`` (`tlog.cli.nbd`) runs nbdkit with the plugin; docs/nbd.md is the guide.
"""

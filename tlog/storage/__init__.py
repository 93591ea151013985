"""The storage pool: the k data + m parity Redis-protocol servers that hold a vdisk's log.

- `tlog.storage.keys`: every key name tlog gives the storage (and the marker values).
- `tlog.storage.blockstore`: the ``<prefix><index>`` keys of a Redis block store, and
  deleting a range of blocks.
- `tlog.storage.address`: server addresses, URLs, credentials and TLS settings.
- `tlog.storage.resp`, `tlog.storage.link`: RESP packing, the blocking connection of bulk
  reads, the pipelined connection of the async servers.
- `tlog.storage.server`: what one storage server does (the interface) and its errors;
  `tlog.storage.redisserver` (pipelined Redis) and `tlog.storage.memoryserver` (in memory).
- `tlog.storage.pool`: a vdisk's pool of servers, and the factories that pick it.
- `tlog.storage.storagemap`: the YAML map of vdisks to storage clusters.
"""

from .address import ServerAddress, StorageConfigError, parse_addresses
from .keys import (
    LAST_HASH_KEEP,
    checkpoint_list_key,
    compaction_key,
    compaction_lock_key,
    compaction_parts_key,
    last_hash_key,
    nbd_regions_key,
    nbd_state_key,
    pin_list_key,
)
from .memoryserver import MemoryStorageServer
from .pool import (
    ClusterPoolFactory,
    MemoryPoolFactory,
    StaticPoolFactory,
    StoragePool,
    StoragePoolFactory,
    any_pool_factory,
)
from .redisserver import RedisStorageServer
from .server import (
    HeadMoved,
    ScriptMissing,
    ScriptRefused,
    StorageError,
    StorageServer,
    Value,
)
from .storagemap import (
    VDISK_ACCESS_KEYS,
    VDISK_SLAVE_KEYS,
    StorageConfig,
    load_storage_config,
    parse_storage_config,
)

__all__ = [
    "LAST_HASH_KEEP", "HeadMoved", "VDISK_ACCESS_KEYS", "VDISK_SLAVE_KEYS", "ClusterPoolFactory",
    "MemoryPoolFactory", "MemoryStorageServer", "RedisStorageServer", "ScriptMissing",
    "ScriptRefused",
    "ServerAddress", "StaticPoolFactory",
    "StorageConfig", "StorageConfigError", "StorageError", "StoragePool", "StoragePoolFactory",
    "StorageServer", "Value", "any_pool_factory", "checkpoint_list_key", "compaction_key",
    "compaction_lock_key", "compaction_parts_key",
    "last_hash_key", "nbd_regions_key", "nbd_state_key", "pin_list_key", "load_storage_config",
    "parse_addresses", "parse_storage_config",
]

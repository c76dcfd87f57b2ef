"""The ``devicemap-fsdp`` plugin: placement ``fsdp`` and the engine that loads FSDP2 shards."""

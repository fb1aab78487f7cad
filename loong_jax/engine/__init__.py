"""The engine: the one loop over a scheduler and an executor, its state, the KV page allocator and the
outputs it streams."""

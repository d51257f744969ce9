"""Device meshes and logical-axis sharding rules (`sharding.py`), and multi-process start-up
(`distributed.py`). The lowest layer besides `errors`: network code constrains activations with
it."""

"""Files: checkpoint folders read and written shard by shard, atomic writes, output locks, the input
energies file."""

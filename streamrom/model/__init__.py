"""What a model is: the architectures' registry, the model families (one file each), the block
described once as data and run by every pass, and the transformers subclass of our checkpoints."""

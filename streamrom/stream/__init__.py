"""The streamer: a checkpoint's blocks one at a time with activations on disk between them; calibration
and evaluation tokens; the loss head; streamed perplexity."""

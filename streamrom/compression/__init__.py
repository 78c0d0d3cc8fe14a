"""The compression pipeline: settings, pass 1 (spectra), the plan, the methods, one block's
compression, the loop with resume, the output format, the shared bayes search."""

"""Inference speed of compressed models, and the cost of a bayes trial."""

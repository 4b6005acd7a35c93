"""Training data: the shapes dataset, TFDS builders (ArrayRecord, no TensorFlow) and the grain input pipeline."""

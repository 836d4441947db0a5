"""The convolutional autoencoder: building, training and exporting it (TensorFlow), and the
portable embedding runtime that every query, index and dedupe path runs (onnxruntime).

Importing this package imports nothing heavy. ``backend`` (imported by model, augment, embed,
train and export) is the only way TensorFlow and Keras come in, quietly; ``runtime`` and
``whitening`` import neither, so a query process never loads TensorFlow.
"""

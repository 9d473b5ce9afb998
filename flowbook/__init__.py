"""flowbook: normalizing flows for image modeling, the package behind the chapters in notebooks/.

Modules: layers (flow layers), nets (the coupling networks), models (ImageFlow and the MNIST flows), data,
noise (where a forward pass's noise comes from), train (the command; its code in training/), evaluate,
bench, fast (the GPU fast path), checkpoints, pretrained, viz, toy, config, exercises, editions.
"""
__version__ = "0.1.0"

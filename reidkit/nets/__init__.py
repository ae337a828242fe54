"""Networks: backbones with pooling and BN neck, MGN, the SYSU-30k classifiers, ghost BN, ImageNet
weights, released checkpoints, and feature extraction."""

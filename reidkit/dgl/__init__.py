"""DGL: bag labels and graphical inference, the weakly supervised losses, the method on the shared
engine, and its evaluation."""

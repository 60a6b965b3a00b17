"""Class-activation maps (Grad-CAM) of a model package's backbone: what the model looked at."""

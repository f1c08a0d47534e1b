"""CUT (Sun, Cao, Fink, "CUT: A Controllable, Universal, and Training-Free Visual Anomaly Generation Framework",
arXiv:2406.01078): ``model`` holds the paper's equations, ``method`` the training-free generation loop. See
cut/README.md."""

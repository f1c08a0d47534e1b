"""SeaS (Dai et al., "SeaS: Few-shot Industrial Anomaly Image Generation with Separation and Sharing
Fine-tuning", arXiv 2410.14987): ``model`` holds the paper's modules and losses, ``method`` the train / generate
entry points. See seas/README.md."""

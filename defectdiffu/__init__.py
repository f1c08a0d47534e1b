"""DefectDiffu (Shi et al., "Few-shot Defect Image Generation based on Consistency Modeling", arXiv:2408.00372):
``model`` holds the paper's architecture, losses and guidance, ``method`` the train / generate entry points. See
defectdiffu/README.md."""

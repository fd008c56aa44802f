"""The small SD3 that ships with ovsd3: coloured handwritten digits (scikit-learn's digits data set), a
model trained on them, and a classifier that checks what a model drew."""

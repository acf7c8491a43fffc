"""The tiny synthetic project the tuning tests share (the CLI's and the MLflow UI's): seconds per trial."""

TINY_STUDY = [
    "data.synthetic.n_patients=60",
    "data.synthetic.size=96",
    "data.synthetic.difficulty=0.2",
    "prepare.sizes=[32]",
    "model.image_size=32",
    "model.width=8",
    "train.batch_size=16",
    "evaluate.bootstrap=50",
    "prepare.workers=1",
]

"""One entry module per DVC stage, named after it; each exposes `stage(params[, name])`.

The spine, in dvc.yaml's order: download → prepare → autoencoder → extract_latents → features →
train (pretrain and every train@RUN) → sample@RUN → evaluate@RUN → speed → figures@NOTEBOOK →
report. `python -m diffrepro <stage>` (cli.py) reads params.yaml, checks it and calls the stage's
`stage`; the stages read and write only where `diffrepro.paths` says. What they compute lives in
the library modules below them (training, sampling, scoring, features, latents, models, methods,
diffusion, data, papers), which never import a stage.
"""

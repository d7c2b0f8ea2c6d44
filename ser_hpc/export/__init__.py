"""Taking a trained ensemble out of the cluster: Hugging Face folder, ONNX graphs, model card.

- ``build.py``: read an ensemble folder (or every fold of a fold ensemble) through
  ser_hpc.inference.ensemble and build the standalone model of ``remote/`` from it, with
  its backbones and heads; checks it against ser_hpc's own forward on a synthetic clip.
- ``hf.py``: write that model as a self-contained transformers repository
  (AutoModelForAudioClassification / pipeline with trust_remote_code).
- ``onnx_graph.py``: one ONNX graph per backbone pair (its members' heads included) and
  the manifest that ser_hpc.inference.onnx_predictor reads.
- ``model_card.py``: README.md with Hugging Face front matter and the ensemble's figures.
- ``staging.py``: everything is written to a temp folder beside DEST, renamed at the end.
- ``remote/``: the model code copied verbatim into the Hugging Face folder; it imports
  torch and transformers only.
"""


class ExportError(ValueError):
    """The ensemble cannot be exported as asked; the message names the file or key."""

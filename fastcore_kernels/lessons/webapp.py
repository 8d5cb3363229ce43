"""Lesson 2's web app: an exported image classifier served over HTTP with Flask.

    python -m fastcore_kernels.lessons.webapp --model lesson_out/lesson2-webapp/export.pkl [--port 8000]

GET / is an upload form; POST /predict takes one image (multipart field `file`) and answers JSON
`{"class": ..., "probabilities": {class: p, ...}}`. Bad uploads get a 4xx with a JSON `error`: no file (400), a file
Pillow cannot read as an image (415), a body over `max_bytes` (413). The model file holds pickled code
(Learner.export): serve only files you made.
"""

from __future__ import annotations

import argparse
import io

import torch

FORM = """<!doctype html><title>fastcore_kernels classifier</title>
<h1>Which digit is it?</h1>
<form method=post action=/predict enctype=multipart/form-data>
<input type=file name=file accept="image/*"> <input type=submit value=Classify></form>"""


def create_app(learn, classes: list[str], size: int = 28, channels: int = 1, max_bytes: int = 2 << 20):
    """A Flask app serving `learn` (a Learner, e.g. from load_learner) on images resized to size x size."""
    from flask import Flask, jsonify, request
    from PIL import Image, UnidentifiedImageError

    app = Flask("fastcore_kernels_classifier")
    app.config["MAX_CONTENT_LENGTH"] = max_bytes

    def error(status: int, message: str):
        return jsonify(error=message), status

    @app.errorhandler(413)
    def too_large(_):
        return error(413, f"upload larger than {max_bytes} bytes")

    @app.get("/")
    def index():
        return FORM

    @app.post("/predict")
    def predict():
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            return error(400, "send one image as the multipart field 'file'")
        data = upload.read()
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
                pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError, ValueError):
            return error(415, "the upload is not an image this server can read (PNG, JPEG, ...)")
        x = pixels.view(size, size, channels).permute(2, 0, 1).float() / 255
        decoded, probs = learn.predict(x)
        return jsonify({"class": classes[int(decoded)],
                        "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs.tolist())}})

    return app


def main(argv=None) -> int:
    from fastcore_kernels.learner import load_learner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Learner.export file")
    ap.add_argument("--classes", default=",".join(str(i) for i in range(10)), help="comma-separated class names")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    create_app(load_learner(args.model), args.classes.split(",")).run(args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TensorFlow Datasets without TensorFlow: a local text builder (array_record) and one reader.

Local corpora are written once as a tfds dataset in ``array_record`` format (random access) and
read back with ``tfds.data_source``; a named dataset a user prepared with tfds (wikipedia, c4,
glue, ...) is read through the very same reader. Neither path imports TensorFlow and nothing calls
``tfds.load``.
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from elm_jax.data.corpus import DataError, Document

LOCAL_TEXT_NAME = "elm_local_text"


class ElmLocalText(tfds.core.GeneratorBasedBuilder):
    """Documents (name, text) per split, given in memory at build time.

    Reading a prepared copy needs no documents: ``tfds.data_source(LOCAL_TEXT_NAME, data_dir=...)``
    constructs this class without them and only reads the files.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Local text documents written as array_record."}

    def __init__(self, *, documents: Mapping[str, Sequence[Document]] | None = None, **kwargs):
        self._documents = documents
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text documents for elm-jax.",
            features=tfds.features.FeaturesDict(
                {"name": tfds.features.Text(), "text": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        if self._documents is None:
            raise DataError("ElmLocalText needs documents to be built")
        return {split: self._generate_examples(docs) for split, docs in self._documents.items()}

    def _generate_examples(self, docs: Sequence[Document]) -> Iterator:
        for i, d in enumerate(docs):
            yield i, {"name": d.name, "text": d.text}


def build_local_text(documents: Mapping[str, Sequence[Document]], data_dir: str | os.PathLike) -> str:
    """Writes ``documents`` (split -> docs) as an array_record tfds dataset under ``data_dir``.

    Idempotent: a complete copy is reused (tfds only publishes a dataset after all its files are
    written, so a killed build leaves no half dataset behind).
    """
    for split, docs in documents.items():
        if not docs:
            raise DataError(f"the {split!r} split has no documents")
    tfds.disable_progress_bar()
    builder = ElmLocalText(documents=documents, data_dir=os.fspath(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return os.fspath(data_dir)


def read_text_split(
    name: str, split: str, data_dir: str | os.PathLike | None, text_key: str = "text",
    name_key: str | None = "name",
) -> list[Document]:
    """Reads every record of ``name``/``split`` with ``tfds.data_source`` as documents.

    ``name`` is ``LOCAL_TEXT_NAME`` for local corpora or any tfds dataset prepared under
    ``data_dir`` (e.g. ``wikipedia/20230601.en``, ``c4/en``); ``text_key`` names its text field.
    """
    try:
        source = tfds.data_source(
            name, split=split, data_dir=os.fspath(data_dir) if data_dir else None,
            download=False, try_gcs=False,
        )
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset
        raise DataError(
            f"cannot open tfds dataset {name!r} split {split!r} in {data_dir}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Prepare it first with "
            f"`tfds build {name.split('/')[0]} --file_format=array_record --data_dir=DIR`."
        ) from None
    docs = []
    for i in range(len(source)):
        rec = source[i]
        if text_key not in rec:
            raise DataError(f"tfds dataset {name!r} has no field {text_key!r}; it has {sorted(rec)}")
        text = rec[text_key]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        doc_name = rec.get(name_key) if name_key else None
        if isinstance(doc_name, bytes):
            doc_name = doc_name.decode("utf-8")
        docs.append(Document(doc_name or f"{name}:{split}:{i}", text))
    return docs

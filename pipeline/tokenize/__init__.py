"""Tokenize stage: a preference dataset -> the ``tokenized`` artifact that the reference pass and training read.

Input (``dataset_name``, or alignment-handbook's ``dataset_mixture`` of several): a directory of
``{split}.jsonl`` / ``{split}.parquet`` files, a Hub snapshot folder (splits found by file name as ``datasets``
finds them, e.g. ``data/train_prefs-00000-of-00001.parquet``), a directory written by ``datasets``'
``save_to_disk``, a single ``.jsonl`` / ``.parquet`` file (the train split), or else a Hugging Face Hub name. The
row layouts of the public preference datasets (standard, conversational, implicit prompt, H4's string prompt
beside conversations that repeat it, hh-rlhf's transcript strings, a system column) are detected from a split's
first row (:mod:`.formats`); ``dataset_columns`` maps other column names first.

Output: ``<output_dir>/tokenized/<fingerprint[:16]>/`` with ``train.parquet``, ``eval.parquet`` (when the
dataset has ``dataset_test_split``) and ``manifest.json`` (written last). One row per kept pair, sorted by
``example_id`` (the 0-based row of the source split; the 0-based line for JSONL, so skipped rows leave gaps).
The fingerprint covers the dataset content, the tokenizer files, the truncation settings, the schema version
and the tokenizer library versions; it is known before any tokenizing, so a complete artifact is reused.

Bad input: a problem with the dataset as a whole, or with a row's shape (missing file, unsupported extension,
malformed JSON line, missing or mistyped field), is a :class:`DataError` naming file, line/row and field.
A well-formed row that cannot train (:data:`.formats.SKIP_REASONS`) is skipped, counted in the manifest and
logged.

The modules, in the order the data flows through them: :mod:`.sources` (where a split's rows come from),
:mod:`.formats` (which layout a row has, and its prompt / chosen / rejected), :mod:`.encode` (text or messages
to token ids, with the chat template), :mod:`.truncation` (the length rule), :mod:`.stage` (the stage: one
split at a time into the artifact) and :mod:`.artifact` (the artifact's schema and its verified reader, what
later stages import).
"""

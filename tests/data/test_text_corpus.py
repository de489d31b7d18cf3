import json

import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import strategies as st

from keras_memtrans.data import TextCorpus

LONG_TEXT = "memory " * 400
TEST_DIRECTORIES = {"test", "tests", "idle_test"}


def write_mixed_directory(root):
    """One usable file at the top, one nested, and one of each unusable kind."""
    (root / "nested").mkdir()
    (root / "good.txt").write_text(LONG_TEXT, encoding="utf-8")
    (root / "nested" / "deeper.txt").write_text("x" * 2500, encoding="utf-8")
    (root / "binary.bin").write_bytes(b"\x00\x01\x02" * 1000)
    (root / "latin1.txt").write_bytes(("café crème " * 300).encode("latin-1"))
    (root / "short.txt").write_text("too short", encoding="utf-8")


def test_directory_keeps_usable_files_and_counts_the_rest(tmp_path):
    write_mixed_directory(tmp_path)
    corpus = TextCorpus(tmp_path)
    assert corpus.names == ["good.txt", "nested/deeper.txt"]
    assert corpus.texts == [LONG_TEXT, "x" * 2500]
    assert (
        list(corpus)
        == corpus.documents
        == [
            ("good.txt", LONG_TEXT),
            ("nested/deeper.txt", "x" * 2500),
        ]
    )
    assert len(corpus) == 2 and corpus[1] == ("nested/deeper.txt", "x" * 2500)
    assert corpus.skipped == {
        "unreadable": 0,
        "binary": 1,
        "not_utf8": 1,
        "too_short": 1,
        "bad_json_lines": 0,
        "duplicate": 0,
    }
    summary = corpus.summary()
    assert "\n" not in summary
    assert "2 documents" in summary and str(tmp_path) in summary
    assert "1 binary" in summary and "1 not_utf8" in summary


def test_min_chars_sets_the_shortest_document(tmp_path):
    write_mixed_directory(tmp_path)
    corpus = TextCorpus(tmp_path, min_chars=5)
    assert "short.txt" in corpus.names
    assert corpus.skipped["too_short"] == 0


def test_glob_reads_only_matching_files(tmp_path):
    write_mixed_directory(tmp_path)
    top_level = TextCorpus(str(tmp_path / "*.txt"))
    assert top_level.names == [str(tmp_path / "good.txt")]
    assert top_level.skipped == {
        "unreadable": 0,
        "binary": 0,
        "not_utf8": 1,
        "too_short": 1,
        "bad_json_lines": 0,
        "duplicate": 0,
    }
    recursive = TextCorpus(str(tmp_path / "**" / "*.txt"))
    assert recursive.names == [
        str(tmp_path / "good.txt"),
        str(tmp_path / "nested" / "deeper.txt"),
    ]


def test_single_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(LONG_TEXT, encoding="utf-8")
    corpus = TextCorpus(path)
    assert corpus.documents == [(str(path), LONG_TEXT)]


def test_jsonl_reads_one_document_per_line(tmp_path):
    path = tmp_path / "shard.jsonl"
    lines = [
        json.dumps({"text": "a" * 2000, "name": "first"}).encode(),
        json.dumps({"text": "b" * 2000, "id": 7}).encode(),
        json.dumps({"text": "c" * 2000}).encode(),
        b"",
        b"{not json",
        json.dumps({"body": "no text field"}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"text": "short"}).encode(),
        b'{"text": "\xff\xfe latin"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    corpus = TextCorpus(path)
    assert corpus.documents == [
        ("first", "a" * 2000),
        ("7", "b" * 2000),
        (f"{path}:3", "c" * 2000),
    ]
    assert corpus.skipped == {
        "unreadable": 0,
        "binary": 0,
        "not_utf8": 1,
        "too_short": 1,
        "bad_json_lines": 3,
        "duplicate": 0,
    }


def test_jsonl_text_field_is_configurable(tmp_path):
    path = tmp_path / "shard.jsonl"
    records = [{"body": "z" * 30, "name": "kept"}, {"text": "y" * 30}]
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    corpus = TextCorpus(path, min_chars=10, text_field="body")
    assert corpus.documents == [("kept", "z" * 30)]
    assert corpus.skipped["bad_json_lines"] == 1


def test_max_documents_stops_reading(tmp_path):
    for index in range(5):
        (tmp_path / f"{index}.txt").write_text(LONG_TEXT + str(index), "utf-8")
    corpus = TextCorpus(tmp_path, max_documents=3)
    assert corpus.names == ["0.txt", "1.txt", "2.txt"]


def test_in_memory_documents_accept_texts_and_pairs():
    corpus = TextCorpus(["a" * 20, ("named", "b" * 20), "tiny"], min_chars=10)
    assert corpus.documents == [("0", "a" * 20), ("named", "b" * 20)]
    assert corpus.skipped["too_short"] == 1


def test_empty_directory_raises_naming_the_source(tmp_path):
    with pytest.raises(ValueError, match="No usable document") as error:
        TextCorpus(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_unusable_files_raise_with_skip_counts(tmp_path):
    (tmp_path / "binary.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "short.txt").write_text("short", encoding="utf-8")
    with pytest.raises(ValueError, match="1 binary, 0 not_utf8, 1 too_short"):
        TextCorpus(tmp_path)


def test_glob_without_match_raises_naming_the_pattern(tmp_path):
    pattern = str(tmp_path / "*.md")
    with pytest.raises(ValueError, match="No usable document") as error:
        TextCorpus(pattern)
    assert pattern in str(error.value)


def test_missing_path_raises_naming_it(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError) as error:
        TextCorpus(missing)
    assert str(missing) in str(error.value)


@pytest.mark.parametrize(
    "arguments, name",
    [
        ({"source": 42}, "source"),
        ({"source": [("a", "b", "c")]}, "Document 0"),
        ({"source": [7]}, "Document 0"),
        ({"min_chars": -1}, "min_chars"),
        ({"min_chars": "10"}, "min_chars"),
        ({"max_documents": 0}, "max_documents"),
        ({"text_field": 3}, "text_field"),
    ],
)
def test_rejects_bad_arguments(arguments, name):
    arguments = {"source": ["x" * 10], **arguments}
    with pytest.raises(ValueError, match=name):
        TextCorpus(**arguments)


@pytest.fixture(scope="module")
def standard_library():
    return TextCorpus()


def test_default_corpus_is_the_standard_library_without_tests(standard_library):
    assert len(standard_library) > 100
    assert {"os.py", "json/decoder.py", "email/message.py"} <= set(
        standard_library.names
    )
    for name, text in standard_library:
        parts = name.split("/")
        assert not TEST_DIRECTORIES.intersection(parts[:-1]), name
        assert not parts[-1].startswith("test_"), name
        assert "site-packages" not in parts and "dist-packages" not in parts
        assert name.endswith(".py")
        assert len(text) >= 2000, name
    assert standard_library.names == sorted(standard_library.names)


def test_default_corpus_is_deterministic_and_truncatable(standard_library):
    first = TextCorpus(max_documents=10)
    assert first.documents == standard_library.documents[:10]


@given(
    count=st.integers(2, 30),
    validation_fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**16),
)
def test_split_is_a_seeded_partition_by_document(count, validation_fraction, seed):
    corpus = TextCorpus([(f"doc{i}", f"text {i}") for i in range(count)], min_chars=0)
    training, validation = corpus.split(validation_fraction, seed=seed)
    expected_validation = min(count - 1, max(1, round(validation_fraction * count)))
    assert len(validation) == expected_validation
    assert len(training) == count - expected_validation
    assert not set(training.names) & set(validation.names)
    assert set(training.names) | set(validation.names) == set(corpus.names)
    for part in (training, validation):
        positions = [corpus.names.index(name) for name in part.names]
        assert positions == sorted(positions)
        assert all(dict(corpus.documents)[name] == text for name, text in part)
    again_training, again_validation = corpus.split(validation_fraction, seed=seed)
    assert again_training.documents == training.documents
    assert again_validation.documents == validation.documents


def test_split_depends_on_the_seed():
    corpus = TextCorpus([(f"doc{i}", f"text {i}") for i in range(40)], min_chars=0)
    splits = {tuple(corpus.split(0.25, seed=seed)[1].names) for seed in range(4)}
    assert len(splits) == 4


def test_split_names_its_parts():
    corpus = TextCorpus(["a", "b", "c"], min_chars=0)
    training, validation = corpus.split(0.5)
    assert "training" in training.source and "validation" in validation.source


def test_split_of_one_document_is_impossible():
    corpus = TextCorpus(["only"], min_chars=0)
    with pytest.raises(ValueError, match="at least 2"):
        corpus.split(0.5)


@pytest.mark.parametrize("validation_fraction", [0, 1, -0.1, 1.5, True, "0.1"])
def test_split_rejects_fractions_outside_the_open_interval(validation_fraction):
    corpus = TextCorpus(["a", "b", "c"], min_chars=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        corpus.split(validation_fraction)


def test_unreadable_files_are_skipped_and_counted(tmp_path, monkeypatch):
    write_mixed_directory(tmp_path)
    real_open = open

    def open_denying_good_txt(path, *args, **kwargs):
        if str(path).endswith("good.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    # Tests run as root, which reads any file: refuse one the way the OS would.
    monkeypatch.setattr("builtins.open", open_denying_good_txt)
    corpus = TextCorpus(tmp_path)
    assert corpus.names == ["nested/deeper.txt"]
    assert corpus.skipped["unreadable"] == 1
    assert "1 unreadable" in corpus.summary()


def write_seven_files(directory):
    directory.mkdir()
    for index in range(7):
        (directory / f"{index}.txt").write_text(LONG_TEXT + str(index), "utf-8")


@pytest.mark.parametrize("pattern", ["**", "**/*.txt"])
def test_glob_does_not_follow_a_directory_link_loop(tmp_path, pattern):
    # d/sub -> d: following it read every file 41 times (up to the OS's
    # limit on nested links), and the copies landed on both sides of a split.
    # Two such links would take 2**40 paths: the walk must not follow them.
    directory = tmp_path / "d"
    write_seven_files(directory)
    (directory / "sub").symlink_to(".", target_is_directory=True)
    corpus = TextCorpus(str(directory / pattern))
    assert corpus.names == [str(directory / f"{index}.txt") for index in range(7)]
    assert corpus.skipped["duplicate"] == 0  # no copy was even reached
    training, validation = corpus.split(0.3)
    assert not set(training.texts) & set(validation.texts)


def test_a_pattern_at_the_file_system_root_is_not_read_in_the_working_directory(
    tmp_path, monkeypatch
):
    (tmp_path / "a.corpus-test").write_text(LONG_TEXT, "utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="No usable document"):
        TextCorpus("/*.corpus-test")
    assert TextCorpus("*.corpus-test").names == ["a.corpus-test"]


def test_directory_reads_a_linked_file_once(tmp_path):
    # A file reached twice is one "duplicate", whatever it holds: a link to
    # a binary file is not a second "binary" one.
    directory = tmp_path / "d"
    write_seven_files(directory)
    (directory / "sub").symlink_to(".", target_is_directory=True)
    (directory / "link.txt").symlink_to("0.txt")
    (directory / "blob.bin").write_bytes(b"\x00" * 2000)
    (directory / "linked.bin").symlink_to("blob.bin")
    corpus = TextCorpus(directory)
    assert corpus.names == [f"{index}.txt" for index in range(7)]
    assert corpus.skipped["duplicate"] == 2
    assert corpus.skipped["binary"] == 1


def test_identical_texts_are_kept_once_under_their_first_name(tmp_path):
    for name in ("b.txt", "a.txt", "c.txt"):
        (tmp_path / name).write_text(LONG_TEXT, "utf-8")
    (tmp_path / "d.txt").write_text(LONG_TEXT + "!", "utf-8")
    (tmp_path / "e.jsonl").write_text(
        "\n".join(json.dumps({"text": text}) for text in (LONG_TEXT, "z" * 2000)),
        "utf-8",
    )
    corpus = TextCorpus(tmp_path)
    assert corpus.names == ["a.txt", "d.txt", "e.jsonl:2"]
    assert corpus.skipped["duplicate"] == 3
    assert "3 duplicate" in corpus.summary()
    in_memory = TextCorpus([("x", "same"), ("y", "other"), ("z", "same")], min_chars=0)
    assert in_memory.documents == [("x", "same"), ("y", "other")]
    assert in_memory.skipped["duplicate"] == 1


@given(
    texts=st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=2),
    seed=st.integers(0, 2**16),
)
def test_split_parts_share_no_text(texts, seed):
    # Duplicate texts under different names: each text is one document,
    # so no validation text is also trained on.
    assume(len(set(texts)) >= 2)
    documents = [(f"doc{i}", text) for i, text in enumerate(texts)]
    corpus = TextCorpus(documents, min_chars=0)
    assert sorted(corpus.texts) == sorted(set(texts))
    training, validation = corpus.split(0.5, seed=seed)
    assert not set(training.texts) & set(validation.texts)
    assert set(training.texts) | set(validation.texts) == set(texts)


@pytest.mark.parametrize("suffix", [".JSONL", ".Jsonl"])
def test_jsonl_suffix_matches_in_any_case(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(json.dumps({"text": "a" * 2000, "name": "first"}), "utf-8")
    assert TextCorpus(path).documents == [("first", "a" * 2000)]

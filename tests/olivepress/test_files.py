"""link_into: the linked copies of a model folder that ONNX Runtime GenAI can still load."""

from olivepress.files import link_into


def test_files_are_symbolic_links_and_a_library_a_hard_link(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    (source / "model.onnx").write_bytes(b"graph")
    (source / "tokenizer").mkdir()
    (source / "liblora_add-0123.so").write_bytes(b"\x7fELF")
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in source.iterdir():
        link_into(copy, item)

    assert (copy / "model.onnx").is_symlink() and (copy / "tokenizer").is_symlink()
    library = copy / "liblora_add-0123.so"
    # its real path stays inside the copy, where ONNX Runtime GenAI looks for custom_ops_library
    assert not library.is_symlink() and library.resolve().parent == copy.resolve()
    assert library.read_bytes() == b"\x7fELF"
    assert library.stat().st_ino == (source / "liblora_add-0123.so").stat().st_ino

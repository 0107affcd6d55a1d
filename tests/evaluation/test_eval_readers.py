"""Each benchmark read from tiny files in its published layout."""

import json

import pytest
from PIL import Image

from grace.evaluation import BenchmarkError, build_prompt, detect, locate, read_benchmark

import bench_files as bf


def test_mmbench_tsv(tmp_path):
    path = bf.write_mmbench(tmp_path / "MMBench_DEV_EN.tsv")
    bench, items = read_benchmark(None, path)
    assert bench == "mmbench" and [i.id for i in items] == [10, 11, 12, 13]
    assert [i.answer for i in items] == ["A", "A", "B", "A"]
    assert [i.letters for i in items] == ["ABCD", "ABC", "AB", "ABCD"]
    assert items[0].hint == "The square is plain." and items[1].hint is None and items[2].hint is None
    assert build_prompt(items[2]) == "Question: Is it a photo?\nOptions:\n(A) yes\n(B) no\nAnswer with only the option letter."
    assert items[0].type == "color_attribute" and items[0].groups["l2-category"] == "attribute"
    assert items[2].load_image().getpixel((1, 1)) == (255, 0, 0)   # the image cell "10" refers to row 10's picture


def test_mmstar_tsv_with_and_without_option_columns(tmp_path):
    plain = read_benchmark("mmstar", bf.write_mmstar(tmp_path / "MMStar.tsv"))[1]
    assert plain[0].options is None and plain[0].pick == "last" and plain[0].type == "coarse perception"
    assert build_prompt(plain[0]).endswith("D: four\n\nAnswer with only the option letter (A, B, C, or D).")
    broken_out = read_benchmark("mmstar", bf.write_mmstar(tmp_path / "MMStar2.tsv", True))[1]
    assert build_prompt(broken_out[1]).startswith("Question: Question 1?\nOptions: A: one")
    assert build_prompt(broken_out[1]).endswith("(D) four\nAnswer with only the option letter.")


def test_scienceqa_test_split_in_pid_splits_order(tmp_path):
    folder = bf.write_scienceqa(tmp_path / "ScienceQA")
    bench, items = read_benchmark(None, folder)
    assert bench == "scienceqa" and [i.id for i in items] == ["3", "1"]
    assert [i.answer for i in items] == ["A", "B"]
    assert items[0].groups == {"subject": "natural science", "modality": "image", "category": "Colors"}
    assert items[1].groups["modality"] == "text" and items[1].image is None
    assert build_prompt(items[1]) == ("Context: Whales breathe air.\nQuestion: Which is a mammal?\nOptions:\n(A) shark\n"
                                      "(B) whale\n(C) trout\nAnswer with only the option letter.")
    assert items[0].load_image().size == (16, 16)
    assert [i.id for i in read_benchmark("scienceqa", folder / "problems.json", split="val")[1]] == ["2"]


def test_scienceqa_images_directly_under_the_folder(tmp_path):
    items = read_benchmark("scienceqa", bf.write_scienceqa(tmp_path / "sqa", image_root=""))[1]
    assert items[0].groups["modality"] == "image"


def test_scienceqa_without_images_or_splits_is_a_clear_error(tmp_path):
    folder = bf.write_scienceqa(tmp_path / "sqa")
    (folder / "images" / "test" / "3" / "image.png").unlink()
    with pytest.raises(BenchmarkError, match="images"):
        read_benchmark("scienceqa", folder)
    (folder / "pid_splits.json").unlink()
    with pytest.raises(BenchmarkError, match="pid_splits.json"):
        read_benchmark("scienceqa", folder)


def test_ai2d_parquet_ids_are_row_positions_in_sorted_shard_order(tmp_path):
    items = read_benchmark("ai2d", bf.write_ai2d(tmp_path / "ai2d"))[1]
    assert [i.id for i in items] == [0, 1, 2, 3] and items[3].question == "Diagram 3?"
    assert [i.answer for i in items] == ["A", "B", "C", "C"] and items[0].type == ""
    assert build_prompt(items[3]) == ("Question: Diagram 3?\nOptions:\n(A) leaf\n(B) root\n(C) stem\n(D) seed\n"
                                      "Answer with only the option letter.")
    assert items[1].load_image().getpixel((0, 0)) == (0, 128, 0)


def test_hallusionbench_parquet(tmp_path):
    bench, items = read_benchmark(None, bf.write_hallusionbench(tmp_path / "HallusionBench"))
    assert bench == "hallusionbench" and len(items) == 6 and all(i.kind == "yesno" for i in items)
    assert items[0].id == {"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": "0",
                           "figure_id": "0", "question_id": "0"}
    assert [i.answer for i in items] == ["0", "1", "1", "1", "0", "0"]
    assert [i.groups["modality"] for i in items] == ["image"] * 4 + ["text"] * 2
    assert items[4].load_images() == [] and build_prompt(items[4]) == "Is the bar red?\nAnswer with only 'Yes' or 'No'."


def test_mmmu_subject_folders(tmp_path):
    bench, items = read_benchmark(None, bf.write_mmmu(tmp_path / "MMMU"))
    assert bench == "mmmu"
    assert [i.id for i in items] == ["validation_Art_1", "validation_Art_2", "validation_Math_1", "validation_Math_2"]
    assert [i.kind for i in items] == ["open", "choice", "choice", "open"]
    assert items[2].type == "Math" and items[2].answer == "B" and items[2].letters == "ABC"
    assert [im.getpixel((0, 0)) for im in items[2].load_images()] == [(0, 0, 255), (255, 0, 0)]  # <image 2> first
    assert build_prompt(items[2]) == ("Question: <image> and <image>: which is larger?\nOptions:\n(A) the first\n"
                                      "(B) the second\n(C) equal\nAnswer with only the option letter.")
    assert build_prompt(items[0]) == "Who painted <image>?\nAnswer with a short phrase or number only."
    assert [i.id for i in read_benchmark("mmmu", tmp_path / "MMMU", split="dev")[1]] == ["dev_Art_1"]


def test_seed_json_and_image_folder(tmp_path):
    bench, items = read_benchmark(None, bf.write_seed(tmp_path / "SEED-Bench"))
    assert bench == "seed" and [i.id for i in items] == ["101", "102", "103"]   # the video question is left out
    assert [i.type for i in items] == ["Scene Understanding", "Instance Identity", "Scene Understanding"]
    assert items[1].load_image().getpixel((0, 0)) == (0, 0, 255)               # data_id without its extension
    assert items[2].error and "999.jpg" in items[2].error
    assert build_prompt(items[0]) == ("Question: Question 101?\nOptions:\n(A) red\n(B) blue\n(C) green\n(D) gray\n"
                                      "Answer with only the option letter.")


def test_shapes_and_conversations(tmp_path):
    a = read_benchmark(None, "shapes-test", limit=4)[1]
    assert [(i.question, i.answer) for i in a] == [(i.question, i.answer) for i in read_benchmark("shapes", "shapes-test", 4)[1]]
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "green").save(tmp_path / "img" / "a.png")
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([{"id": "a", "image": "img/a.png", "type": "color", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "green"}]}]))
    item = read_benchmark(None, path)[1][0]
    assert item.question == "What color?" and build_prompt(item) == "What color?" and item.type == "color"


def test_limit_and_bad_paths(tmp_path):
    assert len(read_benchmark("mmbench", bf.write_mmbench(tmp_path / "m.tsv"), limit=2)[1]) == 2
    with pytest.raises(BenchmarkError, match="does not exist"):
        read_benchmark("mmbench", tmp_path / "nope.tsv")
    (tmp_path / "bad.tsv").write_text("just\ttext\n1\t2\n")
    with pytest.raises(BenchmarkError, match="column"):
        read_benchmark("mmbench", tmp_path / "bad.tsv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(BenchmarkError, match="parquet"):
        read_benchmark("ai2d", tmp_path / "broken.parquet")
    with pytest.raises(BenchmarkError, match="--bench"):
        read_benchmark(None, tmp_path)


def test_a_data_root_with_all_seven(tmp_path):
    bf.write_data_root(tmp_path)
    found = {bench: locate(tmp_path, bench).name for bench in
             ("hallusionbench", "mmbench", "scienceqa", "ai2d", "mmmu", "seed", "mmstar")}
    assert found == {"hallusionbench": "HallusionBench", "mmbench": "MMBench_DEV_EN.tsv", "scienceqa": "ScienceQA",
                     "ai2d": "AI2D", "mmmu": "MMMU", "seed": "SEED-Bench", "mmstar": "MMStar.tsv"}
    assert detect(tmp_path / "AI2D") == "ai2d"


def test_unreadable_pictures_are_plain_errors(tmp_path):
    from grace.evaluation import EvalItem
    from grace.evaluation.item import Base64Image

    with pytest.raises(ValueError, match="nope.png"):
        EvalItem("q", "a", image=tmp_path / "nope.png").load_image()
    with pytest.raises(ValueError, match="embedded image"):
        EvalItem("q", "a", image=Base64Image("bm90IGFuIGltYWdl")).load_image()
    with pytest.raises(ValueError, match="no bytes"):
        EvalItem("q", "a", image={"bytes": None, "path": None}).load_image()

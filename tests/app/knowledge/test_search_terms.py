from app.knowledge.text import query_terms, terms


def test_words_are_lower_cased_and_cjk_runs_become_bigrams() -> None:
    assert terms("Refund Policy: 客服中心") == ["refund", "polici", "客服", "服中", "中心"]


def test_a_single_cjk_character_stays_a_term() -> None:
    assert terms("我 ok") == ["我", "ok"]


def test_mixed_scripts_split_where_the_script_changes() -> None:
    assert terms("GPU加速") == ["gpu", "加速"]


def test_japanese_and_korean_are_bigrammed_too() -> None:
    assert terms("カタカナ") == ["カタ", "タカ", "カナ"]
    assert terms("한국어") == ["한국", "국어"]


def test_english_words_are_stemmed_so_forms_of_a_word_match() -> None:
    assert terms("Refunds processed, shipping") == ["refund", "process", "ship"]
    assert terms("refund process ships") == ["refund", "process", "ship"]


def test_query_terms_drop_stop_words_and_duplicates() -> None:
    assert query_terms("what is the refund policy of the refunds") == ["refund", "polici"]


def test_a_query_of_stop_words_only_keeps_them() -> None:
    assert query_terms("what is it") == ["what", "is", "it"]

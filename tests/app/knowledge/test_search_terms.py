from app.knowledge.text import index_text, query_terms, terms


def test_words_are_lower_cased_and_cjk_runs_become_bigrams() -> None:
    assert terms("Refund Policy: 客服中心") == ["refund", "policy", "客服", "服中", "中心"]


def test_a_single_cjk_character_stays_a_term() -> None:
    assert terms("我 ok") == ["我", "ok"]


def test_mixed_scripts_split_where_the_script_changes() -> None:
    assert terms("GPU加速") == ["gpu", "加速"]


def test_japanese_and_korean_are_bigrammed_too() -> None:
    assert terms("カタカナ") == ["カタ", "タカ", "カナ"]
    assert terms("한국어") == ["한국", "국어"]


def test_index_text_joins_terms_with_spaces() -> None:
    assert index_text("退款政策 refunds") == "退款 款政 政策 refunds"


def test_query_terms_drop_stop_words_and_duplicates() -> None:
    assert query_terms("what is the refund policy of the refund") == ["refund", "policy"]


def test_a_query_of_stop_words_only_keeps_them() -> None:
    assert query_terms("what is it") == ["what", "is", "it"]

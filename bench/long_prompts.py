"""Long-context data for README's memory table: each of the first 80 items of data_sample.jsonl with
other items' contexts put in front of its own, until its prompt (balto's template, SmolLM2's tokenizer)
is at least TOKENS long. The item's own context stays last, so its question stays answerable.

    python bench/long_prompts.py 2000 > runs/long/p2000.jsonl    # README used 2000, 4000 and 7950
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import balto  # noqa: E402

target = int(sys.argv[1])
_, tokenizer = balto.load_policy("smollm2")
items = balto.load_items("data_sample.jsonl")
for i, item in enumerate(items[:80]):
    context, j = item["context"], i + 1
    # counted as training tokenizes prompts (and as the window check counts them)
    while len(balto.tokenize_prompts(tokenizer, [{**item, "context": context}])["input_ids"][0]) < target:
        context = items[j % len(items)]["context"] + " " + context
        j += 1
    print(json.dumps({"id": item["id"], "context": context, "question": item["question"],
                      **({"answer": item["answer"]} if "answer" in item else {})}))

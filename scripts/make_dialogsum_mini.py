#!/usr/bin/env python3
"""Writes data/dialogsum-mini/{train,validation,test}.jsonl: a small dialogue-summarization
dataset in SAMSum's format (`id`, `dialogue`, `summary`), written for adapterlab.

The dialogues are synthetic: short everyday scenes built from hand-written templates, with
names, places, items and times drawn from a seeded generator, so the set is reproducible and
free of third-party text. Run from the repository root: `python3 scripts/make_dialogsum_mini.py`.
"""
import json
import random
from pathlib import Path

NAMES = ["Amara", "Ben", "Chloe", "Dev", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Kemi", "Luca", "Maya", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara",
         "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe"]
PLACES = ["the library", "the station", "the new cafe on Elm Street", "the gym", "the park",
          "the office", "the cinema", "the market", "Rosa's flat", "the swimming pool"]
TIMES = ["at 6", "at half past seven", "tomorrow morning", "on Saturday", "after lunch",
         "at noon", "on Friday evening", "in twenty minutes", "at 9 tonight", "on Sunday"]
ITEMS = ["the charger", "my umbrella", "the blue folder", "the concert tickets", "the car keys",
         "the recipe book", "the spare key", "my headphones", "the projector cable", "the tent"]
FOODS = ["pizza", "sushi", "a curry", "tacos", "pasta", "dumplings", "a salad", "burgers"]
SUBJECTS = ["the maths exam", "the budget report", "the history essay", "the client demo",
            "the grant proposal", "the team presentation", "the lab report"]
PETS = ["cat", "dog", "parrot", "rabbit", "hamster"]
MOVIES = ["the new space film", "the documentary about bees", "the comedy with the talking goat",
          "the old detective film", "the animated musical"]


def scene(rng):
    a, b = rng.sample(NAMES, 2)
    kind = rng.randrange(12)
    place, time, item = rng.choice(PLACES), rng.choice(TIMES), rng.choice(ITEMS)
    food, subj, pet, movie = rng.choice(FOODS), rng.choice(SUBJECTS), rng.choice(PETS), rng.choice(MOVIES)
    if kind == 0:
        d = [f"{a}: Are we still meeting {time}?", f"{b}: Yes, but can we do it at {place}?",
             f"{a}: Sure, that works for me.", f"{b}: Great, see you there."]
        s = f"{a} and {b} will meet {time} at {place}."
    elif kind == 1:
        d = [f"{a}: Have you seen {item}?", f"{b}: I think I left it at {place}.",
             f"{a}: Can you bring it back {time}?", f"{b}: Okay, I will."]
        s = f"{b} left {item.replace('my ', a + chr(39) + 's ')} at {place} and will bring it back {time}."
    elif kind == 2:
        d = [f"{a}: I'm so hungry. Shall we order {food}?", f"{b}: We had {food} yesterday.",
             f"{a}: Fine, you choose then.", f"{b}: Let's cook at home instead.", f"{a}: Deal."]
        s = f"{a} wanted to order {food}, but they will cook at home."
    elif kind == 3:
        d = [f"{a}: I'm stuck on {subj}.", f"{b}: Do you want help?",
             f"{a}: That would be amazing. Are you free {time}?", f"{b}: Yes, come to {place}."]
        s = f"{b} will help {a} with {subj} {time} at {place}."
    elif kind == 4:
        d = [f"{a}: My train is delayed, I'll be late.", f"{b}: How late?",
             f"{a}: About forty minutes.", f"{b}: No problem, I'll wait at {place}."]
        s = f"{a}'s train is delayed by about forty minutes; {b} will wait at {place}."
    elif kind == 5:
        d = [f"{a}: Could you feed my {pet} {time}?", f"{b}: Sure. How much food?",
             f"{a}: One scoop, and fresh water please.", f"{b}: Got it.", f"{a}: Thanks a lot!"]
        s = f"{b} will feed {a}'s {pet} {time}: one scoop of food and fresh water."
    elif kind == 6:
        d = [f"{a}: Want to watch {movie} {time}?", f"{b}: I've already seen it.",
             f"{a}: Oh. Something else then?", f"{b}: Let's just go for a walk in the park."]
        s = f"{b} has already seen {movie}, so they will go for a walk instead."
    elif kind == 7:
        d = [f"{a}: Did you finish {subj}?", f"{b}: Almost, I need one more day.",
             f"{a}: The deadline is {time}.", f"{b}: I know, I'll send it before then."]
        s = f"{b} has almost finished {subj} and will send it before the deadline {time}."
    elif kind == 8:
        d = [f"{a}: I can't find my wallet anywhere.", f"{b}: Did you check {place}?",
             f"{a}: Not yet.", f"{b}: I'll call them for you.", f"{a}: You're a star."]
        s = f"{a} lost a wallet; {b} will call {place} to ask about it."
    elif kind == 9:
        d = [f"{a}: Happy birthday!", f"{b}: Thank you! Are you coming to the party {time}?",
             f"{a}: Of course. Should I bring anything?", f"{b}: Maybe some {food}."]
        s = f"It is {b}'s birthday; {a} will come to the party {time} and bring {food}."
    elif kind == 10:
        d = [f"{a}: The heating at {place} is broken again.", f"{b}: Did you tell the manager?",
             f"{a}: Yes, someone comes {time}.", f"{b}: Good, bring a jumper until then."]
        s = f"The heating at {place} is broken; a repair is planned {time}."
    else:
        d = [f"{a}: Can I borrow {item}?", f"{b}: Sure, when do you need it?",
             f"{a}: {time[0].upper() + time[1:]}.", f"{b}: I'll leave it at {place} for you."]
        s = f"{a} will borrow {item.replace('my ', b + chr(39) + 's ')}; {b} will leave it at {place}."
    return "\n".join(d), s


def main():
    rng = random.Random(20261127)
    seen, rows = set(), []
    while len(rows) < 320:
        dialogue, summary = scene(rng)
        if dialogue in seen:
            continue
        seen.add(dialogue)
        rows.append((dialogue, summary))
    out = Path("data/dialogsum-mini")
    out.mkdir(parents=True, exist_ok=True)
    for name, part in [("train", rows[:260]), ("validation", rows[260:290]), ("test", rows[290:])]:
        with open(out / f"{name}.jsonl", "w") as f:
            for i, (dialogue, summary) in enumerate(part):
                row = {"id": f"dsm-{name}-{i:04d}", "dialogue": dialogue, "summary": summary}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

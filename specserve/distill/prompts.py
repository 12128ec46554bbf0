"""Training prompts for draft distillation, built from templates (never from Spec-Bench).

The mix follows the kinds of requests a chat model serves: open writing, role-play, reasoning,
arithmetic word problems, code, extraction, science and humanities questions, short factual
questions, translation, and long-context summarization and retrieval-augmented answering. The
long-context prompts wrap documents that the target itself wrote in an earlier round
(``document_prompts``), so no outside corpus is needed, though passages of one can be added
(``corpus_prompts``). The target also writes user turns of its own (Magpie: it continues its chat
template from the start of a user turn), which brings the variety of the conversations it was
tuned on rather than of this file's templates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOPICS = [
    "renewable energy", "the history of the printing press", "urban gardening", "black holes",
    "the Roman Empire", "machine learning", "coral reefs", "the French Revolution", "volcanoes",
    "healthy sleep", "the stock market", "honey bees", "the Silk Road", "electric cars",
    "climate change", "ancient Egypt", "the human immune system", "jazz music", "chess strategy",
    "the Industrial Revolution", "plate tectonics", "public libraries", "space exploration",
    "the water cycle", "remote work", "the Renaissance", "antibiotics", "social media",
    "rainforests", "the Olympic Games", "coffee production", "quantum computing", "photosynthesis",
    "the Great Wall of China", "volunteering", "ocean tides", "the invention of the telephone",
    "meditation", "recycling", "desert ecosystems", "the Cold War", "vaccines", "bicycles",
    "artificial intelligence ethics", "the Amazon river", "3D printing", "migratory birds",
    "the history of chocolate", "earthquakes", "personal finance", "the Moon landing",
    "wind turbines", "medieval castles", "nutrition", "the internet", "glaciers", "democracy",
    "public transportation", "classical music", "the periodic table", "solar eclipses",
    "small businesses", "wolves", "the Byzantine Empire", "cybersecurity", "marathon training",
    "the history of writing", "tea ceremonies", "nuclear power", "photography", "minimalism",
]
PLACES = [
    "Kyoto", "Iceland", "Peru", "Morocco", "New Zealand", "Vienna", "Cape Town", "Vietnam",
    "Scotland", "Patagonia", "Istanbul", "Norway", "Mexico City", "Bali", "Prague", "Kenya",
]
PERSONAS = [
    "a pirate captain", "a medieval knight", "a detective in 1920s London", "a friendly robot",
    "a wise old wizard", "a famous chef", "an astronaut on Mars", "a sports coach",
    "a museum tour guide", "a stand-up comedian", "a marine biologist", "a school teacher",
]
WRITING = [
    "Write a short story about {topic}.",
    "Write a blog post about a trip to {place}, with tips for first-time visitors.",
    "Compose a poem about {topic}.",
    "Write a persuasive essay arguing why everyone should learn about {topic}.",
    "Draft a professional email to a colleague proposing a workshop on {topic}.",
    "Write a product description for a new gadget related to {topic}.",
    "Write a speech for a school graduation that mentions {topic}.",
    "Write a letter to a friend describing your visit to {place}.",
]
ROLEPLAY = [
    "Pretend to be {persona}. Explain {topic} to me.",
    "You are {persona}. Describe your typical day.",
    "Act as {persona} and give me advice about {topic}.",
    "Imagine you are {persona} visiting {place}. What do you tell the locals?",
]
KNOWLEDGE = [
    "Explain {topic} in simple terms.",
    "What are the main advantages and disadvantages of {topic}?",
    "Give me five interesting facts about {topic}.",
    "How has {topic} changed over the last hundred years?",
    "What should a beginner know about {topic}?",
    "Describe the most important ideas behind {topic}.",
    "Compare {topic} with {other}. How are they similar and different?",
    "Why is {topic} important for society?",
]
QA = [
    "What is the capital of {country}?", "Who wrote {book}?", "When did {event} happen?",
    "What language is spoken in {country}?", "Who painted {painting}?",
    "How many {unit} are in a {bigger}?", "What is the largest {thing} in the world?",
]
QA_FILL = {
    "country": ["France", "Japan", "Brazil", "Canada", "Egypt", "Australia", "India", "Chile",
                "Sweden", "Kenya", "Thailand", "Argentina", "Poland", "Portugal"],
    "book": ["Pride and Prejudice", "Moby-Dick", "War and Peace", "The Odyssey", "Hamlet",
             "Don Quixote", "The Great Gatsby", "1984", "Frankenstein", "Jane Eyre"],
    "event": ["the French Revolution", "the first Moon landing", "World War I",
              "the fall of the Berlin Wall", "the signing of the Magna Carta",
              "the invention of the printing press", "the first Olympic Games"],
    "painting": ["the Mona Lisa", "The Starry Night", "The Last Supper", "Guernica",
                 "The Persistence of Memory", "The Scream", "Girl with a Pearl Earring"],
    "unit": ["centimeters", "minutes", "grams", "days", "inches", "seconds"],
    "bigger": ["meter", "hour", "kilogram", "year", "foot", "day"],
    "thing": ["ocean", "desert", "planet", "mammal", "country", "lake", "mountain"],
}
CODING = [
    "Write a Python function that {task}.",
    "Implement {task_alt} in Python and explain how it works.",
    "Write a JavaScript function that {task}.",
    "Explain what a {concept} is in programming, with a short example.",
]
CODE_TASKS = [
    "checks whether a string is a palindrome", "returns the n-th Fibonacci number",
    "counts the words in a text file", "merges two sorted lists", "reverses a linked list",
    "finds the largest number in a list", "removes duplicates from a list",
    "converts Celsius to Fahrenheit", "checks whether a number is prime",
    "sorts a list of dictionaries by a key", "computes the factorial of a number",
]
CODE_ALGORITHMS = ["binary search", "bubble sort", "a stack class", "a queue using two stacks",
                   "depth-first search", "a simple calculator", "merge sort", "a word counter"]
CODE_CONCEPTS = ["recursion", "closure", "hash map", "class", "generator", "decorator",
                 "race condition", "unit test", "API", "variable scope"]
REASONING = [
    "If all {a} are {b} and some {b} are {c}, can we conclude that some {a} are {c}? Explain.",
    "A farmer has {n} sheep. All but {k} run away. How many are left? Explain your reasoning.",
    "Tom is taller than Anna, and Anna is taller than Ben. Who is the shortest? Explain.",
    "What comes next in the sequence {seq}? Explain the pattern.",
    "If today is {day}, what day of the week will it be in {n} days? Explain.",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORD_PROBLEMS = [
    "{name} buys {a} apples for ${p} each and {b} oranges for ${q} each. How much does {name} spend in total?",
    "A train travels {a} miles in {b} hours. What is its average speed in miles per hour?",
    "{name} has {a} marbles and gives {b} of them to a friend. Then {name} buys {c} more. How many marbles does {name} have now?",
    "A rectangle is {a} meters long and {b} meters wide. What are its area and perimeter?",
    "{name} saves ${a} every week. How many weeks does it take to save ${total}?",
    "A shop sells a shirt for ${a}. During a sale the price drops by {pct}%. What is the new price?",
    "{name} reads {a} pages a day. The book has {total} pages. How many days does it take to finish it?",
    "There are {a} students in a class and {b} of them are girls. What percentage of the class are boys?",
]
NAMES = ["Maria", "James", "Aisha", "Chen", "Lucas", "Emma", "Omar", "Sofia", "Ravi", "Nina"]
MATH = [
    "Solve for x: {a}x + {b} = {c}.",
    "What is {a}% of {c}?",
    "Find the area of a circle with radius {a}.",
    "What is the sum of the interior angles of a polygon with {n} sides?",
    "Simplify the fraction {a}/{c}.",
]
EXTRACTION = [
    "Extract all the names of people and places from this text: {text}",
    "List the key facts in the following paragraph as bullet points: {text}",
    "Classify the sentiment of this review as positive, negative or neutral: {review}",
]
REVIEWS = [
    "The food was cold and the waiter ignored us for twenty minutes.",
    "Absolutely loved this phone, the battery lasts two days and the camera is great.",
    "The movie was fine, nothing special, but the music was nice.",
    "Terrible customer service, I will never order from this store again.",
    "A wonderful hotel with friendly staff and a beautiful view of the sea.",
]
# Short German sentences for the translation prompts (written for this project).
GERMAN = [
    "Der Zug nach Berlin hat heute eine Stunde Verspätung.",
    "Die Regierung plant neue Investitionen in erneuerbare Energien.",
    "Meine Großmutter backt jeden Sonntag einen Apfelkuchen.",
    "Die Preise für Lebensmittel sind im letzten Jahr stark gestiegen.",
    "Im Sommer fahren viele Familien an die Ostsee.",
    "Der Bürgermeister eröffnete gestern die neue Bibliothek.",
    "Die Mannschaft gewann das Spiel nach einem späten Tor.",
    "Wissenschaftler haben eine neue Art von Fröschen entdeckt.",
    "Das Museum zeigt eine Ausstellung über die Geschichte der Stadt.",
    "Viele junge Menschen ziehen in die großen Städte.",
    "Die Firma hat im dritten Quartal einen Gewinn erzielt.",
    "Es regnet seit drei Tagen ohne Pause.",
    "Der Arzt empfiehlt mehr Bewegung und gesunde Ernährung.",
    "Die Schüler lernen in der Schule zwei Fremdsprachen.",
    "Nach dem Sturm waren viele Straßen gesperrt.",
    "Die Polizei sucht Zeugen für den Unfall auf der Autobahn.",
    "Das neue Gesetz tritt im nächsten Jahr in Kraft.",
    "Ich habe mein Fahrrad vor dem Bahnhof abgestellt.",
    "Die Konferenz findet in diesem Jahr in Wien statt.",
    "Der Flughafen wurde wegen Nebels für zwei Stunden geschlossen.",
    "Die Bauern klagen über die Trockenheit im Frühling.",
    "Unsere Nachbarn haben einen kleinen Hund aus dem Tierheim geholt.",
    "Die Universität bietet kostenlose Kurse für ältere Menschen an.",
    "Der Film erzählt die Geschichte einer mutigen Ärztin.",
]
DOCUMENT_REQUESTS = [
    "Write a detailed news article about {topic}.",
    "Write a long encyclopedia-style article about {topic}.",
    "Write a detailed report about recent developments in {topic}.",
]
DOCUMENT_TASKS = [  # (category, template)
    ("summarization", "Summarize: {doc}"),
    ("summarization", "Summarize the following article in a few sentences.\n\n{doc}"),
    ("rag", "{doc}\n\nBased on the passage above, what are the three most important points?"),
    ("rag", "Read the text and answer the question.\n\n{doc}\n\nQuestion: What is the main topic of the text, and what does it say about it?"),
    ("rag", "{doc}\n\nWrite a short headline and a one-paragraph summary for this article."),
]
CORPUS_TASKS = DOCUMENT_TASKS + [  # real text is also quoted to extract from and to reply to
    ("extraction", "Extract the people, places, organizations and dates mentioned in the text below, as a list.\n\n{doc}"),
    ("rag", "{doc}\n\nIn one or two sentences, what is the author's main point?"),
    ("writing", "Write a reply to this message.\n\n{doc}"),
]


SELF_PROMPT = "self-prompt"  # a request for the target to write a user turn itself
MIN_SELF_PROMPT_CHARS = 10


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    category: str
    text: str


def chat_prompts(count: int, seed: int) -> list[Prompt]:
    """``count`` distinct single-turn prompts across the short-context categories."""
    rng = random.Random(seed)
    makers = [
        ("writing", lambda: rng.choice(WRITING).format(topic=rng.choice(TOPICS), place=rng.choice(PLACES))),
        ("roleplay", lambda: rng.choice(ROLEPLAY).format(
            persona=rng.choice(PERSONAS), topic=rng.choice(TOPICS), place=rng.choice(PLACES))),
        ("knowledge", lambda: rng.choice(KNOWLEDGE).format(topic=rng.choice(TOPICS), other=rng.choice(TOPICS))),
        ("qa", lambda: rng.choice(QA).format(**{k: rng.choice(v) for k, v in QA_FILL.items()})),
        ("coding", lambda: rng.choice(CODING).format(
            task=rng.choice(CODE_TASKS), task_alt=rng.choice(CODE_ALGORITHMS), concept=rng.choice(CODE_CONCEPTS))),
        ("reasoning", lambda: rng.choice(REASONING).format(
            a=rng.choice(["cats", "roses", "students", "cars"]), b=rng.choice(["animals", "flowers", "people", "machines"]),
            c=rng.choice(["pets", "red things", "athletes", "fast"]), n=rng.randint(5, 40), k=rng.randint(2, 9),
            seq=", ".join(str(rng.randint(1, 5) * i + rng.randint(0, 3)) for i in range(1, 6)), day=rng.choice(DAYS))),
        ("math_reasoning", lambda: rng.choice(WORD_PROBLEMS).format(
            name=rng.choice(NAMES), a=rng.randint(2, 60), b=rng.randint(2, 30), c=rng.randint(2, 20),
            p=rng.randint(1, 9), q=rng.randint(1, 9), total=rng.randint(100, 600), pct=rng.choice([10, 20, 25, 30, 50]))),
        ("math", lambda: rng.choice(MATH).format(
            a=rng.randint(2, 12), b=rng.randint(1, 30), c=rng.randint(20, 200), n=rng.randint(3, 12))),
        ("extraction", lambda: rng.choice(EXTRACTION).format(
            text=f"{rng.choice(NAMES)} travelled from {rng.choice(PLACES)} to {rng.choice(PLACES)} to study {rng.choice(TOPICS)}.",
            review=rng.choice(REVIEWS))),
        ("translation", lambda: "Translate German to English: " + rng.choice(GERMAN)),
    ]
    seen: set[str] = set()
    prompts: list[Prompt] = []
    attempts = 0
    while len(prompts) < count and attempts < count * 50:
        attempts += 1
        category, make = makers[attempts % len(makers)]
        text = make()
        if text not in seen:
            seen.add(text)
            prompts.append(Prompt(f"{category}-s{seed}-{len(prompts)}", category, text))
    return prompts


def document_requests(count: int, seed: int) -> list[Prompt]:
    """Prompts whose answers become the documents of the long-context round."""
    rng = random.Random(seed + 1)
    topics = rng.sample(TOPICS, min(count, len(TOPICS)))
    topics += [rng.choice(TOPICS) for _ in range(count - len(topics))]
    return [
        Prompt(f"document-s{seed}-{i}", "document", rng.choice(DOCUMENT_REQUESTS).format(topic=topic))
        for i, topic in enumerate(topics)
    ]


def document_prompts(
    documents: dict[str, str], seed: int, tasks: list[tuple[str, str]] = DOCUMENT_TASKS
) -> list[Prompt]:
    """Summarization and retrieval-style prompts over documents (by document id), one task each."""
    rng = random.Random(seed + 2)
    prompts = []
    for doc_id, doc in documents.items():
        category, template = rng.choice(tasks)
        prompts.append(Prompt(f"{category}-{doc_id}", category, template.format(doc=doc.strip())))
    return prompts


def corpus_prompts(passages: list[str], count: int, seed: int) -> list[Prompt]:
    """Prompts over ``count`` passages of an outside corpus (``corpus.read_passages``), a new
    draw for every seed."""
    rng = random.Random(seed + 3)
    chosen = rng.sample(passages, min(max(count, 0), len(passages)))
    return document_prompts({f"corpus-s{seed}-{i}": p for i, p in enumerate(chosen)}, seed, CORPUS_TASKS)


def self_prompt_requests(count: int, seed: int) -> list[Prompt]:
    """Requests whose sampled answers are user turns the target writes itself."""
    return [Prompt(f"{SELF_PROMPT}-s{seed}-{i}", SELF_PROMPT, "") for i in range(count)]


def self_written_prompts(turns: dict[str, str]) -> list[Prompt]:
    """The distinct user turns the target wrote (by prompt id), as prompts to answer."""
    seen: set[str] = set()
    prompts = []
    for turn_id, text in turns.items():
        text = text.strip()
        if len(text) >= MIN_SELF_PROMPT_CHARS and text not in seen:
            seen.add(text)
            prompts.append(Prompt(f"self-written-{turn_id}", "self-written", text))
    return prompts

"""Raw emotion rows (``{"text","emotion","intensity","trigger"}``) for ``ftkit data synth emotion``.

Three modes, all balanced over the labels and free of duplicate texts:

* ``offline`` (default): composed from seed samples below, no key, no network; deterministic for
  a seed. ``bench/make_emotion_quickstart.py`` writes the bundled quickstart file with it.
* ``anthropic`` / ``openai``: asks an LLM through the provider's official SDK (``pip install
  'ftkit[synth]'``); the key comes from the argument or ``ANTHROPIC_API_KEY`` / ``OPENAI_API_KEY``
  and is never logged, printed or put in an error message.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ftkit.errors import DataError, UsageError

log = logging.getLogger(__name__)

Row = dict[str, Any]

# -- offline: seed samples -----------------------------------------------------------------------
# A subject and a time, a situation that typically triggers the emotion, and an emotion-specific
# reaction (a cue phrase, or an intensity adverb plus a feeling word): the label is learnable from
# the words, which is what the quickstart needs to show a tiny model beating chance.

SUBJECTS = (
    "我", "媽媽", "爸爸", "小明", "小華", "室友", "同事阿傑", "姐姐",
    "弟弟", "王太太", "奶奶", "表哥", "女朋友", "班長", "老張", "阿美",
)
TIMES = (
    # No time of day: a situation such as "深夜一個人走在..." must read naturally after any of them.
    "今天", "昨天", "剛才", "上週末", "前幾天", "上個月",
    "最近", "那天", "週五", "去年", "暑假時", "過年時",
)
# Intensity adverb -> intensity (1-5) for the "adverb + feeling" templates.
ADVERBS = {"有點": 1, "有一點": 1, "還蠻": 2, "挺": 2, "很": 3, "相當": 3, "非常": 4, "特別": 4, "極度": 5, "無比": 5}

# label -> (situations = triggers, cue phrases with their intensity, feeling words)
EMOTIONS: dict[str, tuple[tuple[str, ...], dict[str, int], tuple[str, ...]]] = {
    "喜悅": (
        (
            "收到了夢寐以求的錄取通知", "考試拿了全班第一", "終於升職加薪", "抽中了演唱會門票",
            "和多年不見的老朋友重逢", "收到一份精心準備的生日禮物", "在比賽中拿下冠軍",
            "順利通過了駕照考試", "找到了理想的工作", "吃到了最愛的紅豆餅", "看到小姪子第一次學會走路",
            "跑完了人生第一場馬拉松", "被喜歡的人告白", "買到了限量的球鞋",
        ),
        {
            "開心得跳了起來": 4, "笑得合不攏嘴": 4, "心裡像喝了蜜一樣甜": 3, "一整天都哼著歌": 3,
            "高興得想大聲歡呼": 5, "忍不住和每個人分享這個好消息": 4, "臉上一直掛著笑容": 2,
            "覺得整個世界都亮了起來": 5, "幸福得快要飛起來": 5, "興奮地抱住了身邊的人": 4,
        },
        ("開心", "高興", "快樂", "欣喜", "滿足"),
    ),
    "悲傷": (
        (
            "養了十年的狗離開了", "和交往多年的戀人分手了", "得知外婆住院的消息", "沒有通過準備了一年的考試",
            "最好的朋友要搬去國外", "翻到已故爺爺的舊照片", "被公司裁員了", "參加了老同學的告別式",
            "心愛的小貓走失了", "一個人在異鄉過年", "努力準備的比賽落選了", "看著老家的房子被拆掉",
        ),
        {
            "忍不住哭了一整晚": 5, "眼淚不停地往下掉": 4, "整個人提不起勁": 2, "心像被掏空了一樣": 4,
            "默默地紅了眼眶": 3, "難過得吃不下飯": 4, "一個人坐在窗邊發呆": 2, "心裡沉甸甸的": 2,
            "覺得好孤單好失落": 3, "哭到說不出話來": 5,
        },
        ("難過", "傷心", "失落", "悲傷", "沮喪"),
    ),
    "憤怒": (
        (
            "被人插隊還被反過來罵", "發現同事把自己的功勞搶走", "被房東無故漲房租", "遇到態度惡劣的店員",
            "被朋友放了鴿子還不道歉", "看到有人虐待流浪狗", "被網友惡意造謠", "買到的新手機被商家掉包",
            "在會議上被主管當眾羞辱", "被樓上鄰居吵得整夜睡不著", "被詐騙集團騙走一大筆錢",
            "發現車子被人刮花而肇事者早已逃走",
        ),
        {
            "氣得直跺腳": 3, "忍不住拍桌大罵": 4, "怒火一下子衝上腦門": 5, "氣得滿臉通紅": 3,
            "咬牙切齒地說一定要討回公道": 4, "火冒三丈地找對方理論": 5, "氣到手都在發抖": 5,
            "越想越火大": 2, "恨不得立刻衝過去算帳": 4, "大聲吼著要對方道歉": 4,
        },
        ("生氣", "憤怒", "火大", "氣憤", "惱火"),
    ),
    "恐懼": (
        (
            "深夜一個人走在沒有路燈的小巷", "聽到窗外傳來奇怪的腳步聲", "遇到了強烈的地震",
            "在天黑前的山路上迷了路", "看完恐怖片後獨自在家", "搭的飛機遇到劇烈亂流", "被一隻大狗追著跑",
            "收到陌生人的威脅簡訊", "在停電的電梯裡被困住", "聽醫生說檢查結果有異常", "聽到有人在撬自家的門",
            "站在高樓的玻璃地板上",
        ),
        {
            "嚇得全身發抖": 4, "心臟怦怦直跳": 3, "害怕得不敢出聲": 4, "嚇出一身冷汗": 3,
            "緊緊抓住身邊的東西不敢放手": 4, "腦中一片空白只想趕快逃走": 5, "嚇得腿都軟了": 5,
            "整晚不敢關燈睡覺": 3, "頭皮發麻背脊發涼": 4, "怕得連呼吸都放輕了": 2,
        },
        ("害怕", "恐懼", "驚恐", "惶恐", "不安"),
    ),
    "驚訝": (
        (
            "發現多年不見的同學竟然成了明星", "一打開門就看到大家準備的驚喜派對", "得知內向的鄰居報名了歌唱比賽",
            "在國外的街頭巧遇鄰居", "聽說一向節儉的舅舅買了跑車", "看到六月天突然下起了冰雹",
            "發現家裡的老貓會自己開門", "得知平常不讀書的表弟考上了台大", "聽說老闆其實是自己的高中學長",
            "在舊書裡發現一封五十年前的信", "看到安靜的同事在台上表演單口相聲", "發現路邊的小店竟然是米其林餐廳",
        ),
        {
            "驚訝得張大了嘴巴": 4, "一時之間說不出話來": 3, "不敢相信自己的眼睛": 4,
            "忍不住大喊真的假的": 4, "愣在原地好幾秒": 3, "眼睛瞪得像銅鈴一樣大": 5,
            "反覆確認了好幾次才相信": 2, "怎麼也想不到會是這樣": 3, "驚呼一聲差點把手機掉在地上": 5,
            "完全沒料到事情會這樣發展": 2,
        },
        ("驚訝", "吃驚", "意外", "震驚", "詫異"),
    ),
    "厭惡": (
        (
            "在餐廳的湯裡吃到一根頭髮", "看到有人在捷運上隨地吐痰", "聞到垃圾車散發的餿味",
            "發現冰箱裡的剩菜長滿了黴", "聽到同事在背後說人壞話還一臉得意", "踩到路邊的狗大便",
            "看到廁所裡滿地的污水", "遇到一個滿嘴謊話又愛炫耀的人", "發現床底下有一窩蟑螂",
            "看到有人把口香糖黏在座位上", "喝到一口已經發酸的牛奶", "看到有人在餐桌上挖鼻孔",
        ),
        {
            "噁心得差點吐出來": 5, "皺著眉頭別過臉去": 2, "一陣反胃再也吃不下東西": 4,
            "嫌惡地捂住鼻子走開": 3, "覺得渾身不舒服只想趕快離開": 3, "忍不住翻了個白眼": 2,
            "一想到就覺得反胃": 4, "打從心底覺得受不了": 3, "連看都不想再多看一眼": 4,
            "嫌棄地把東西丟進垃圾桶": 3,
        },
        ("噁心", "反感", "厭惡", "嫌惡", "倒胃口"),
    ),
}


LABELS: tuple[str, ...] = tuple(EMOTIONS)
MODES = ("offline", "anthropic", "openai")

# Gives up on a label after this many duplicate compositions in a row: its seed samples are spent.
_MAX_OFFLINE_MISSES = 10_000


def compose(rng: random.Random, label: str) -> Row:
    """One row for ``label``: a random template filled with the label's situation and reaction."""
    situations, cues, feelings = EMOTIONS[label]
    subject, time_, situation = rng.choice(SUBJECTS), rng.choice(TIMES), rng.choice(situations)
    cue = rng.choice(sorted(cues))
    adverb, feeling = rng.choice(sorted(ADVERBS)), rng.choice(feelings)
    template = rng.randrange(4)
    if template == 0:
        text, intensity = f"{time_}{subject}{situation}，{cue}。", cues[cue]
    elif template == 1:
        text, intensity = f"{subject}{time_}{situation}，{adverb}{feeling}。", ADVERBS[adverb]
    elif template == 2:
        # Reaction first, cause second: the model must not rely on word position alone.
        text, intensity = f"{subject}{adverb}{feeling}，因為{time_}{situation}。", ADVERBS[adverb]
    else:
        text = f"{time_}{subject}{situation}，{adverb}{feeling}，{cue}。"
        intensity = round((ADVERBS[adverb] + cues[cue]) / 2)
    return {"text": text, "emotion": label, "intensity": intensity, "trigger": situation}


def _quotas(n: int, labels: Sequence[str]) -> dict[str, int]:
    """``n`` split over ``labels`` as evenly as possible (the first labels take the remainder)."""
    base, extra = divmod(n, len(labels))
    return {label: base + (i < extra) for i, label in enumerate(labels)}


def _offline(quotas: dict[str, int], seed: int) -> list[Row]:
    """Each label's quota of composed rows with distinct texts, shuffled (seeded)."""
    unknown = [label for label in quotas if label not in EMOTIONS]
    if unknown:
        raise UsageError(
            f"offline mode has seed samples only for {', '.join(LABELS)}, not {', '.join(unknown)}: "
            "use --mode anthropic or openai for other labels"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[Row] = []
    for label, quota in quotas.items():
        count = misses = 0
        while count < quota:
            row = compose(rng, label)
            if row["text"] in seen:
                misses += 1
                if misses > _MAX_OFFLINE_MISSES:
                    raise UsageError(f"offline mode ran out of distinct {label} sentences after {count}: "
                                     "ask for fewer rows or use --mode anthropic or openai")
                continue
            misses = 0
            seen.add(row["text"])
            rows.append(row)
            count += 1
    rng.shuffle(rows)
    return rows


# -- API modes -----------------------------------------------------------------------------------

DEFAULT_MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4o-mini"}
KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}

# Topics drawn (seeded) into each request so that repeated requests for a label do not all come
# back with the same handful of sentences.
TOPICS = (
    "工作", "學校", "家人", "朋友", "感情", "鄰居", "旅行", "交通", "天氣", "飲食", "購物", "寵物",
    "健康", "運動", "網路", "金錢", "節日", "搬家", "考試", "面試", "醫院", "夜晚", "童年回憶", "新聞",
)

SYSTEM_PROMPT = "你是為情緒分類模型製作訓練資料的助手。只輸出 JSON，不要任何說明文字。"

_FENCE = re.compile(r"```[a-zA-Z]*")


def build_prompt(label: str, count: int, labels: Sequence[str], topics: Sequence[str], avoid: Sequence[str]) -> str:
    """The user message asking for ``count`` rows of ``label``."""
    lines = [
        (f"請寫 {count} 句彼此不同的繁體中文句子，每句都清楚表達「{label}」這種情緒"
         f"（情緒類別：{'、'.join(labels)}）。"),
        "句子要自然、口語，主角、場景和說法都要有變化，長度 15 到 50 個字。",
        f"這一批請多寫這些題材：{'、'.join(topics)}。",
        ("以 JSON 陣列回覆，每個元素是一個物件："
         f'{{"text": 句子, "emotion": "{label}", "intensity": 1 到 5 的整數（情緒強度）, '
         '"trigger": 引發這個情緒的情境（簡短片語）}。'),
        "只輸出這個 JSON 陣列。",
    ]
    if avoid:
        lines.append("不要重複下列已有的句子：\n" + "\n".join(f"- {text}" for text in avoid))
    return "\n".join(lines)


def extract_objects(reply: str) -> list[Any]:
    """The JSON objects in a model reply: a JSON array (fenced or not), else every object found.

    The fallback keeps the complete rows of a reply cut off at the token limit.
    """
    text = _FENCE.sub("", reply).strip()
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            parsed = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            pass
        else:
            if isinstance(parsed, list):
                return parsed
    decoder, objects, pos = json.JSONDecoder(), [], text.find("{")
    while pos >= 0:
        try:
            value, stop = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(value, dict):
            objects.extend(value["rows"] if isinstance(value.get("rows"), list) else [value])
        pos = text.find("{", stop)
    return objects


def clean_row(item: Any, label: str) -> Row | None:
    """``item`` as a raw row of ``label``, or None when a field is missing or wrong."""
    if not isinstance(item, dict):
        return None
    text, emotion, trigger = item.get("text"), item.get("emotion"), item.get("trigger")
    if not (isinstance(text, str) and text.strip() and isinstance(trigger, str) and trigger.strip()):
        return None
    if not isinstance(emotion, str) or emotion.strip() != label:
        return None
    intensity = item.get("intensity")
    if isinstance(intensity, str) and intensity.strip().isdigit():
        intensity = int(intensity)
    if isinstance(intensity, float) and intensity.is_integer():
        intensity = int(intensity)
    if isinstance(intensity, bool) or not isinstance(intensity, int) or not 1 <= intensity <= 5:
        return None
    return {"text": text.strip(), "emotion": label, "intensity": intensity, "trigger": trigger.strip()}


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _complete_fn(mode: str, model: str, base_url: str | None, api_key: str, max_retries: int,
                 timeout: float) -> tuple[Callable[[str], str], Callable[[], None]]:
    """``(complete(prompt) -> reply text, close())`` for the provider's SDK client."""
    try:
        if mode == "anthropic":
            import anthropic as sdk
        else:
            import openai as sdk
    except ImportError:
        raise UsageError(f"--mode {mode} needs the `{mode}` package: pip install 'ftkit[synth]'") from None
    # The SDK retries connection errors, timeouts, 429 and 5xx itself, with backoff and Retry-After.
    if mode == "anthropic":
        client = sdk.Anthropic(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout)

        def complete(prompt: str) -> str:
            message = client.messages.create(model=model, max_tokens=4096, system=SYSTEM_PROMPT,
                                             messages=[{"role": "user", "content": prompt}])
            return "".join(getattr(block, "text", "") for block in message.content if block.type == "text")
    else:
        client = sdk.OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout)

        def complete(prompt: str) -> str:
            completion = client.chat.completions.create(
                model=model,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            )
            return (completion.choices[0].message.content or "") if completion.choices else ""

    def checked(prompt: str) -> str:
        try:
            return complete(prompt)
        except sdk.APIStatusError as error:
            status = error.status_code
            if status in (401, 403):
                raise UsageError(f"the {mode} API refused the key (HTTP {status}): check {KEY_ENV[mode]}") from None
            # `from None` and the redaction: an error body may echo request details, the key among them.
            detail = " ".join(_redact(str(getattr(error, "message", "") or ""), api_key).split())[:300]
            retried = f" after {max_retries} retries" if status in (408, 409, 429) or status >= 500 else ""
            raise DataError(f"the {mode} API answered HTTP {status}{retried}: {detail}") from None
        except sdk.APIConnectionError as error:
            kind = "timed out" if isinstance(error, sdk.APITimeoutError) else "could not be reached"
            raise DataError(f"the {mode} API {kind} after {max_retries} retries: "
                            "check the network or --base-url") from None

    return checked, client.close


def _api(quotas: dict[str, int], seed: int, mode: str, model: str | None, base_url: str | None,
         api_key: str | None, batch_size: int, max_retries: int, backoff: float, timeout: float) -> Iterator[Row]:
    """Checks the key and the SDK now (not at the first row), then streams the rows."""
    key = api_key or os.environ.get(KEY_ENV[mode], "")
    if not key:
        raise UsageError(f"--mode {mode} needs an API key: set {KEY_ENV[mode]}")
    complete, close = _complete_fn(mode, model or DEFAULT_MODELS[mode], base_url, key, max_retries, timeout)
    return _api_rows(complete, close, quotas, seed, batch_size, max_retries, backoff)


def _api_rows(complete: Callable[[str], str], close: Callable[[], None], quotas: dict[str, int], seed: int,
              batch_size: int, max_retries: int, backoff: float) -> Iterator[Row]:
    """Rows from the model, one batch per label in turn (so a run cut short stays balanced)."""
    labels = tuple(quotas)
    rng = random.Random(seed)
    seen: set[str] = set()
    made: dict[str, list[str]] = {label: [] for label in labels}
    try:
        while any(len(made[label]) < quotas[label] for label in labels):
            for label in labels:
                wanted = min(batch_size, quotas[label] - len(made[label]))
                if wanted <= 0:
                    continue
                for row in _batch(complete, label, wanted, labels, rng, seen, made[label][-10:],
                                  max_retries, backoff):
                    seen.add(row["text"])
                    made[label].append(row["text"])
                    yield row
    finally:
        close()


def _batch(complete: Callable[[str], str], label: str, wanted: int, labels: Sequence[str], rng: random.Random,
           seen: set[str], avoid: Sequence[str], max_retries: int, backoff: float) -> list[Row]:
    """Up to ``wanted`` new valid rows of ``label``; asks again (with backoff) while a reply has none."""
    for attempt in range(max_retries + 1):
        prompt = build_prompt(label, wanted, labels, rng.sample(TOPICS, 3), avoid)
        rows, texts = [], set(seen)
        for item in extract_objects(complete(prompt)):
            row = clean_row(item, label)
            if row is not None and row["text"] not in texts:
                texts.add(row["text"])
                rows.append(row)
        if rows:
            return rows[:wanted]
        if attempt < max_retries:
            delay = backoff * 2**attempt
            log.info("the model's reply held no usable new %s rows; asking again in %.1f s", label, delay)
            time.sleep(delay)
    raise DataError(f"the model gave no usable new {label} rows in {max_retries + 1} tries: "
                    "try another --model, or fewer rows per request (batch_size)")


# -- entry point ---------------------------------------------------------------------------------

def synthesize(n: int, *, seed: int = 0, mode: str = "offline", model: str | None = None,
               base_url: str | None = None, api_key: str | None = None, labels: Sequence[str] = LABELS,
               batch_size: int = 20, max_retries: int = 3, backoff: float = 1.0,
               timeout: float = 120.0) -> Iterator[Row]:
    """``n`` raw emotion rows, balanced over ``labels``, with distinct texts.

    :param n: Rows to make.
    :param seed: Offline: fixes the output. API modes: fixes the topics asked for, not the reply.
    :param mode: ``offline``, ``anthropic`` or ``openai``.
    :param model: API modes: the model (default: :data:`DEFAULT_MODELS`).
    :param base_url: API modes: the API's base URL (a proxy, a compatible server, a test fake).
    :param api_key: API modes: the key; default the provider's environment variable.
    :param labels: The labels to cover (offline: some of :data:`LABELS`).
    :param batch_size: API modes: rows asked for per request.
    :param max_retries: API modes: the SDK's retries of a failed request, and how many more times
        a reply without usable rows is asked again.
    :param backoff: API modes: seconds before re-asking after an unusable reply, doubled each time.
    :param timeout: API modes: seconds one request may take.
    """
    labels = tuple(labels)
    if mode not in MODES:
        raise UsageError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")
    if n < 0 or batch_size < 1 or max_retries < 0:
        raise UsageError("need n >= 0, batch_size >= 1 and max_retries >= 0")
    if not labels or len(set(labels)) != len(labels):
        raise UsageError("`labels` must be distinct, non-empty label names")
    quotas = _quotas(n, labels)
    if mode == "offline":
        return iter(_offline(quotas, seed))
    return _api(quotas, seed, mode, model, base_url, api_key, batch_size, max_retries, backoff, timeout)

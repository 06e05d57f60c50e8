//! The console's two languages: Persian (the default: right to left, Persian digits, Solar
//! Hijri dates) and English (ISO dates). Both in Tehran time (Asia/Tehran is UTC+03:30 all
//! year since 2022, when Iran stopped daylight saving).
//!
//! Every fixed text of the console is a [`Msg`]; the table below gives each key its English
//! and its Persian text side by side, so a key without both is a compile error. Texts with
//! values in them are small functions here, each a `match` on [`Lang`].
//!
//! The language is the `cardpipe_lang` cookie, set by `GET /console/lang?to=en&back=/console/…`
//! (`back` must be a local console path: [`safe_back`]).

use cardpipe_common::solar_hijri::{SolarHijri, persian_digits};
use time::{OffsetDateTime, UtcOffset};

/// The language cookie.
pub const LANG_COOKIE: &str = "cardpipe_lang";

/// Tehran time: UTC+03:30 (no daylight saving since 2022).
pub const TEHRAN: UtcOffset = match UtcOffset::from_hms(3, 30, 0) {
    Ok(o) => o,
    Err(_) => panic!("UTC+03:30 is a valid offset"),
};

/// A console language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    /// Persian: right to left, Persian digits, Solar Hijri dates (the default).
    #[default]
    Fa,
    /// English: left to right, ISO dates.
    En,
}

impl Lang {
    /// `fa` / `en` (the cookie value and the `lang` attribute).
    pub fn code(self) -> &'static str {
        match self {
            Lang::Fa => "fa",
            Lang::En => "en",
        }
    }

    /// The language of a cookie value; anything unknown is the default (Persian).
    pub fn from_code(code: Option<&str>) -> Self {
        match code.map(str::trim) {
            Some("en") => Lang::En,
            _ => Lang::Fa,
        }
    }

    /// `rtl` / `ltr`.
    pub fn dir(self) -> &'static str {
        match self {
            Lang::Fa => "rtl",
            Lang::En => "ltr",
        }
    }

    /// Right to left?
    pub fn rtl(self) -> bool {
        self == Lang::Fa
    }

    /// The other language (the switch in the header).
    pub fn other(self) -> Self {
        match self {
            Lang::Fa => Lang::En,
            Lang::En => Lang::Fa,
        }
    }

    /// The language's own name, for the switch.
    pub fn name(self) -> &'static str {
        match self {
            Lang::Fa => "فارسی",
            Lang::En => "English",
        }
    }

    /// A fixed text.
    pub fn t(self, m: Msg) -> &'static str {
        m.text(self)
    }

    /// A number (or any text with digits) in this language's digits.
    pub fn num(self, n: impl std::fmt::Display) -> String {
        let s = n.to_string();
        match self {
            Lang::Fa => persian_digits(&s),
            Lang::En => s,
        }
    }

    /// A percentage with one decimal: `97.5%` / `٪۹۷٫۵`.
    pub fn percent(self, fraction: f64) -> String {
        let p = format!("{:.1}", fraction * 100.0);
        match self {
            Lang::Fa => format!("٪{}", persian_digits(&p).replace('.', "٫")),
            Lang::En => format!("{p}%"),
        }
    }

    /// A date and time in Tehran time: `۱۴۰۵/۰۹/۱۵ ۱۶:۲۵` (Solar Hijri, Persian digits) or
    /// `2026-12-06 16:25 Tehran`.
    pub fn datetime(self, at: OffsetDateTime) -> String {
        let local = at.to_offset(TEHRAN);
        let clock = format!("{:02}:{:02}", local.hour(), local.minute());
        match self {
            Lang::Fa => match SolarHijri::from_gregorian(local.date()) {
                Ok(d) => format!("{} {}", d.numeric(), persian_digits(&clock)),
                Err(_) => persian_digits(&format!("{} {clock}", local.date())),
            },
            Lang::En => format!("{} {clock} Tehran", local.date()),
        }
    }

    /// A stored RFC 3339 timestamp as [`Lang::datetime`]; text that is not one is shown as is.
    pub fn stored_time(self, text: &str) -> String {
        match cardpipe_common::clock::from_rfc3339(text) {
            Ok(at) => self.datetime(at),
            Err(_) => text.to_owned(),
        }
    }

    /// The hour of day in Tehran (`۱۶` / `16`), for chart axes.
    pub fn hour(self, at: OffsetDateTime) -> String {
        self.num(format!("{:02}", at.to_offset(TEHRAN).hour()))
    }
}

/// `back` if it is a path of this console (`/console` or below, no scheme, no host, no
/// `//`, no backslash, no control characters), else `/console/`: the language switch
/// redirects only inside the console.
pub fn safe_back(back: Option<&str>) -> String {
    let Some(b) = back else {
        return "/console/".into();
    };
    let under_console = b == "/console"
        || b.starts_with("/console/")
        || b.starts_with("/console?")
        || b.starts_with("/console#");
    if under_console
        && !b.contains("//")
        && !b.contains('\\')
        && !b.chars().any(|c| c.is_control() || c.is_whitespace())
        && !b.contains("/../")
        && !b.ends_with("/..")
    {
        b.to_owned()
    } else {
        "/console/".into()
    }
}

macro_rules! messages {
    ($($key:ident => $en:literal, $fa:literal;)*) => {
        /// A fixed text of the console, in both languages.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Msg {
            $(
                #[doc = $en]
                $key,
            )*
        }

        impl Msg {
            /// Every key.
            pub const ALL: &'static [Msg] = &[$(Msg::$key),*];

            /// The text in `lang`.
            pub fn text(self, lang: Lang) -> &'static str {
                match (self, lang) {
                    $(
                        (Msg::$key, Lang::En) => $en,
                        (Msg::$key, Lang::Fa) => $fa,
                    )*
                }
            }
        }
    };
}

messages! {
    // Frame and navigation
    Console => "cardpipe console", "کنسول cardpipe";
    Overview => "Overview", "نمای کلی";
    Dashboard => "Dashboard", "داشبورد";
    Search => "Search", "جستجو";
    Adjudication => "Adjudication", "داوری";
    ParkedWork => "Parked work", "کارهای متوقف";
    Encoders => "Encoders", "رمزگذارها";
    Stock => "Stock", "موجودی";
    Shipments => "Shipments", "محموله‌ها";
    AuditLog => "Audit log", "گزارش ممیزی";
    SignOut => "Sign out", "خروج";
    SwitchLanguage => "Language", "زبان";
    TimesNote => "Times are Tehran time (UTC+03:30).", "زمان‌ها به وقت تهران (UTC+03:30) هستند.";
    // Roles
    RoleOperator => "operator", "اپراتور";
    RoleSupervisor => "supervisor", "سرپرست";
    RoleAuditor => "auditor", "ممیز";
    // Errors and status pages
    Error => "Error", "خطا";
    InternalError => "Internal error", "خطای داخلی";
    ErrorLogged => "The error was logged.", "خطا ثبت شد.";
    NotAllowed => "Not allowed", "مجاز نیست";
    NotFound => "Not found", "پیدا نشد";
    NotFoundText => "There is no such page in the console.", "چنین صفحه‌ای در کنسول وجود ندارد.";
    FormExpired => "Form expired", "فرم منقضی شده است";
    FormExpiredText => "The form's security token does not match this session (an old page, or a request from another site). Reload the page and try again.", "نشانهٔ امنیتی فرم با این نشست نمی‌خواند (صفحه‌ای قدیمی، یا درخواستی از سایتی دیگر). صفحه را دوباره بارگذاری کنید و دوباره تلاش کنید.";
    NoSuchBatch => "No such batch", "چنین دسته‌ای وجود ندارد";
    NoSuchApplication => "No such application", "چنین درخواستی وجود ندارد";
    NeverFlagged => "This application was never flagged as a possible duplicate", "این درخواست هرگز به‌عنوان تکراری احتمالی علامت نخورده است";
    ActionInternal => "internal error (logged); nothing was changed", "خطای داخلی (ثبت شد)؛ چیزی تغییر نکرد";
    ErrBadInput => "Invalid input", "ورودی نامعتبر";
    ErrNotFound => "Not found", "پیدا نشد";
    ErrConflict => "Not possible in the current state", "در وضعیت کنونی ممکن نیست";
    ErrForbidden => "Your role may not do this", "نقش شما اجازهٔ این کار را ندارد";
    ErrDetails => "details", "جزئیات";
    // Login
    SignIn => "Sign in", "ورود";
    SignInTitle => "cardpipe console — sign in", "کنسول cardpipe — ورود";
    Login => "Login", "نام کاربری";
    Password => "Password", "گذرواژه";
    LoginExpired => "the sign-in form expired; please try again", "فرم ورود منقضی شد؛ لطفاً دوباره تلاش کنید";
    BadCredentials => "wrong login or password", "نام کاربری یا گذرواژه نادرست است";
    LoginBusy => "too many sign-ins are being checked at once; try again in a few seconds", "ورودهای زیادی هم‌زمان بررسی می‌شوند؛ چند ثانیهٔ دیگر دوباره تلاش کنید";
    SignedOut => "signed out", "از سامانه خارج شدید";
    // Overview
    PipelineOverview => "Pipeline overview", "نمای کلی خط تولید";
    Applications => "applications", "درخواست";
    PossibleDuplicates => "possible duplicates", "تکراری احتمالی";
    ParkedJobs => "parked jobs", "کار متوقف";
    StateChangesLastHour => "state changes in the last hour", "تغییر وضعیت در یک ساعت گذشته";
    ApplicationsPerState => "Applications per state", "درخواست‌ها بر حسب وضعیت";
    State => "state", "وضعیت";
    Queues => "Queues", "صف‌ها";
    NoStageHere => "This process runs no stage; queue depths are on the workers' /metrics.", "این فرایند هیچ مرحله‌ای را اجرا نمی‌کند؛ عمق صف‌ها در ‎/metrics‎ کارگرها است.";
    Stage => "stage", "مرحله";
    Ready => "ready", "آماده";
    Retrying => "retrying", "در تلاش مجدد";
    Parked => "parked", "متوقف";
    Throughput => "Throughput (state changes, last hour)", "گذردهی (تغییر وضعیت‌ها، یک ساعت گذشته)";
    EnteredState => "entered state", "وضعیت واردشده";
    Changes => "changes", "تغییرات";
    Batches => "Batches", "دسته‌ها";
    // Batches
    BatchCol => "batch", "دسته";
    Client => "client", "مشتری";
    Priority => "priority", "اولویت";
    Records => "records", "رکورد";
    Accepted => "accepted", "پذیرفته";
    Rejected => "rejected", "ردشده";
    Progress => "progress", "پیشرفت";
    Received => "received", "دریافت";
    Batch => "Batch", "دسته";
    Application => "Application", "درخواست";
    ApplicationCol => "application", "درخواست";
    RegistryId => "registry id", "شناسهٔ ثبت";
    Updated => "updated", "به‌روزرسانی";
    // Search
    FindApplication => "Find an application", "یافتن درخواست";
    SearchPlaceholder => "application id, registry id or tracking code", "شناسهٔ درخواست، شناسهٔ ثبت یا کد رهگیری";
    NoApplicationWith => "No application with id, registry id or tracking code", "هیچ درخواستی با این شناسه، شناسهٔ ثبت یا کد رهگیری نیست:";
    // Application
    Name => "name", "نام";
    FathersName => "father's name", "نام پدر";
    NationalCode => "national code", "کد ملی";
    TrackingCode => "tracking code", "کد رهگیری";
    PickupOffice => "pickup office", "دفتر تحویل";
    AdjudicateThis => "Adjudicate this possible duplicate", "داوری این تکراری احتمالی";
    History => "History", "تاریخچه";
    At => "at", "زمان";
    From => "from", "از";
    To => "to", "به";
    Attempt => "attempt", "تلاش";
    Actor => "actor", "کنشگر";
    Reason => "reason", "دلیل";
    QualityControl => "Quality control", "کنترل کیفیت";
    CheckedAt => "checked at", "زمان بررسی";
    Outcome => "outcome", "نتیجه";
    BlankSerial => "blank serial", "سریال کارت خام";
    ChipSerial => "chip serial", "سریال تراشه";
    Ms => "ms", "میلی‌ثانیه";
    Report => "report", "گزارش";
    Certificates => "Certificates", "گواهی‌ها";
    Serial => "serial", "سریال";
    Key => "key", "کلید";
    IssuedAt => "issued at", "زمان صدور";
    Status => "status", "وضعیت";
    RevocationCause => "revocation cause", "علت ابطال";
    RevokedAt => "revoked at", "زمان ابطال";
    Artifacts => "Artifacts", "فایل‌ها";
    Kind => "kind", "نوع";
    ObjectKey => "object key", "کلید شیء";
    // Adjudication
    PossibleDuplicatesTitle => "Possible duplicates", "تکراری‌های احتمالی";
    NoAdjudications => "No possible duplicate is waiting.", "هیچ تکراری احتمالی در انتظار نیست.";
    Flagged => "flagged", "علامت‌خورده";
    Candidates => "candidates", "نامزدها";
    BestScore => "best score", "بهترین امتیاز";
    PossibleDuplicate => "Possible duplicate", "تکراری احتمالی";
    ApplicationDetail => "application detail", "جزئیات درخواست";
    Candidate => "Candidate", "نامزد";
    FusedScore => "fused score", "امتیاز ترکیبی";
    ApplicantPhoto => "applicant photo", "عکس متقاضی";
    CandidatePhoto => "candidate photo", "عکس نامزد";
    ThisApplication => "This application", "این درخواست";
    Position => "position", "جایگاه";
    Finger => "finger", "انگشت";
    Score => "score", "امتیاز";
    Decision => "Decision", "تصمیم";
    DecisionClear => "Not the same person: clear (continues to keys)", "شخص دیگری است: پاک (به مرحلهٔ کلیدها می‌رود)";
    DecisionConfirm => "Same person: confirm the duplicate (supervisor; final)", "همان شخص است: تأیید تکراری (سرپرست؛ نهایی)";
    ReasonLabel => "Reason", "دلیل";
    RecordDecision => "Record decision", "ثبت تصمیم";
    FingerRightThumb => "right thumb", "شست راست";
    FingerRightIndex => "right index", "اشارهٔ راست";
    FingerRightMiddle => "right middle", "میانی راست";
    FingerRightRing => "right ring", "حلقهٔ راست";
    FingerRightLittle => "right little", "کوچک راست";
    FingerLeftThumb => "left thumb", "شست چپ";
    FingerLeftIndex => "left index", "اشارهٔ چپ";
    FingerLeftMiddle => "left middle", "میانی چپ";
    FingerLeftRing => "left ring", "حلقهٔ چپ";
    FingerLeftLittle => "left little", "کوچک چپ";
    // Parked work
    Job => "job", "کار";
    Attempts => "attempts", "تلاش‌ها";
    LastError => "last error", "آخرین خطا";
    ParkedAt => "parked at", "زمان توقف";
    Actions => "actions", "اقدام‌ها";
    Retry => "Retry", "تلاش دوباره";
    Drop => "Drop", "کنار گذاشتن";
    ForceFail => "Force-fail", "شکست اجباری";
    ReasonPlaceholder => "reason", "دلیل";
    ParkedHelp => "Retry sends the job back to its stage as a fresh attempt. Drop (supervisor) forgets the job and leaves the application where it is. Force-fail (supervisor) ends the application: rejected if never released, otherwise cancelled (certificates revoked).", "«تلاش دوباره» کار را با تلاشی تازه به مرحله‌اش برمی‌گرداند. «کنار گذاشتن» (سرپرست) کار را فراموش می‌کند و درخواست را همان‌جا که هست نگه می‌دارد. «شکست اجباری» (سرپرست) درخواست را پایان می‌دهد: اگر هرگز آزاد نشده ردشده، وگرنه لغوشده (گواهی‌ها باطل می‌شوند).";
    NothingParked => "Nothing is parked.", "هیچ کاری متوقف نیست.";
    DeadLettersHelp => "Registry callbacks, citizen messages and job hand-offs the outbox relay gave up on: refused as malformed by the receiver, or failed too many times. Re-queue (supervisor) once the cause is fixed; discard (supervisor) what must not be sent.", "پاسخ‌های ثبت، پیام‌های شهروندان و واگذاری کارهایی که رلهٔ صندوق خروجی از آن‌ها دست کشید: گیرنده آن‌ها را نادرست دانست، یا بارها شکست خوردند. پس از رفع علت دوباره در صف بگذارید (سرپرست)؛ آنچه نباید فرستاده شود را دور بریزید (سرپرست).";
    NoDeadLetters => "No dead letters.", "هیچ نامهٔ مرده‌ای نیست.";
    Requeue => "Re-queue", "بازگشت به صف";
    Discard => "Discard", "دور ریختن";
    SupervisorRequeues => "a supervisor re-queues or discards it", "سرپرست آن را به صف برمی‌گرداند یا دور می‌ریزد";
    Number => "number", "شماره";
    Topic => "topic", "موضوع";
    Subject => "subject", "موضوع کار";
    Written => "written", "نوشته‌شده";
    GivenUp => "given up", "رهاشده";
    // Encoders
    Encoder => "encoder", "رمزگذار";
    Now => "now", "اکنون";
    Personalized => "personalized", "شخصی‌سازی‌شده";
    Spoiled => "spoiled", "خراب‌شده";
    Yield => "yield", "بازده";
    CardsLastHour => "cards last hour", "کارت در یک ساعت گذشته";
    Service => "service", "سرویس";
    Absent => "absent", "غایب";
    InService => "in service", "در سرویس";
    OutOfService => "out of service", "خارج از سرویس";
    Busy => "busy", "مشغول";
    Idle => "idle", "بیکار";
    TakeOut => "Take out of service", "خارج کردن از سرویس";
    ReturnToService => "Return to service", "بازگرداندن به سرویس";
    FarmLive => "Live state from this process's encoder farm; counts from the cards table.", "وضعیت زنده از مزرعهٔ رمزگذار این فرایند؛ شمارش‌ها از جدول کارت‌ها.";
    FarmNone => "This process drives no encoder: counts from the cards table, service state from operators' decisions.", "این فرایند هیچ رمزگذاری را نمی‌راند: شمارش‌ها از جدول کارت‌ها، وضعیت سرویس از تصمیم اپراتورها.";
    NoEncoder => "No encoder has been seen yet.", "هنوز هیچ رمزگذاری دیده نشده است.";
    // Audit
    SubjectPlaceholder => "subject (application, job, operator…)", "موضوع (درخواست، کار، اپراتور…)";
    Filter => "Filter", "پالایش";
    VerifyChain => "Verify the whole chain", "بررسی کل زنجیره";
    ChainIntact => "The chain is intact:", "زنجیره سالم است:";
    ChainEntries => "entries, every hash and link checks.", "مدخل، همهٔ درهم‌سازی‌ها و پیوندها درست‌اند.";
    ChainCheckpoints => "Whether entries were cut from its end is checked against the signed checkpoints by", "اینکه مدخلی از انتهای آن بریده شده باشد با نقاط وارسی امضاشده بررسی می‌شود، با";
    ChainBroken => "The chain is broken:", "زنجیره شکسته است:";
    Role => "role", "نقش";
    Action => "action", "اقدام";
    Details => "details", "جزئیات";
    Hash => "hash", "درهم‌سازی";
    // Stock, shipments
    StockTitle => "Blank-card stock and quality control", "موجودی کارت خام و کنترل کیفیت";
    StockWhat => "blank-card stock or quality-control", "موجودی کارت خام یا کنترل کیفیت";
    NotAvailable => "Not available.", "در دسترس نیست.";
    NotAvailableText => "This installation has no tables for this yet (the stage that keeps them is not part of this build, or its migrations have not run). Nothing to show.", "این نصب هنوز جدولی برای این بخش ندارد (مرحله‌ای که آن‌ها را نگه می‌دارد بخشی از این ساخت نیست، یا مهاجرت‌هایش اجرا نشده است). چیزی برای نمایش نیست.";
    Rows => "rows", "ردیف";
    First => "first", "نخستین";
    ShipmentsTitle => "Shipments and office discrepancies", "محموله‌ها و مغایرت‌های دفاتر";
    ShipmentsWhat => "shipping or delivery", "ارسال یا تحویل";
    OfficeDiscrepancies => "Office discrepancies", "مغایرت‌های دفاتر";
    Open => "open", "باز";
    DiscrepancyHelp => "A missing card is found (the office can then receive it) or lost in transit (its certificates are revoked and a reprint is requested); an extra card is returned to the centre or its own office. Supervisors resolve.", "کارت گم‌شده یا پیدا می‌شود (دفتر سپس می‌تواند آن را تحویل بگیرد) یا در راه گم شده است (گواهی‌هایش باطل و چاپ دوباره درخواست می‌شود)؛ کارت اضافه به مرکز یا دفتر خودش بازگردانده می‌شود. سرپرستان رسیدگی می‌کنند.";
    NoDiscrepancies => "No discrepancy has been reported.", "هیچ مغایرتی گزارش نشده است.";
    Id => "id", "شناسه";
    BoxCol => "box", "جعبه";
    Office => "office", "دفتر";
    Card => "card", "کارت";
    ReportedBy => "reported by", "گزارش‌دهنده";
    ReportedAt => "reported at", "زمان گزارش";
    Resolution => "resolution", "رسیدگی";
    Resolve => "Resolve", "رسیدگی";
    Note => "note", "یادداشت";
    By => "by", "توسط";
    Reprint => "reprint", "چاپ دوباره";
    SupervisorResolves => "open (a supervisor resolves it)", "باز (سرپرست رسیدگی می‌کند)";
    // Dashboard
    DashboardTitle => "Dashboard", "داشبورد";
    PerStage24h => "Applications per stage, last 24 hours", "درخواست‌ها بر حسب مرحله، ۲۴ ساعت گذشته";
    PerStage24hHelp => "Each bar is one hour (Tehran time); it counts the state changes recorded in the application history in that hour, coloured by the state entered. An application that moved through three states in an hour counts three times.", "هر ستون یک ساعت (به وقت تهران) است؛ تغییر وضعیت‌های ثبت‌شده در تاریخچهٔ درخواست‌ها در آن ساعت را می‌شمارد، با رنگ وضعیتی که وارد آن شده‌اند. درخواستی که در یک ساعت از سه وضعیت گذشته سه بار شمرده می‌شود.";
    NoChanges24h => "No state change was recorded in the last 24 hours.", "در ۲۴ ساعت گذشته هیچ تغییر وضعیتی ثبت نشده است.";
    HourAxis => "hour (Tehran)", "ساعت (تهران)";
    ChangesAxis => "state changes", "تغییر وضعیت";
    QueueDepth => "Queue depth per stage", "عمق صف بر حسب مرحله";
    QueueDepthHelp => "Jobs waiting in each stage's queue now, from the broker. A broker that cannot tell is shown as unknown, not as zero.", "کارهای منتظر در صف هر مرحله در همین لحظه، از کارگزار پیام. کارگزاری که نمی‌تواند بگوید «نامعلوم» نشان داده می‌شود، نه صفر.";
    Unknown => "unknown", "نامعلوم";
    EncoderYield => "Encoder yield", "بازده رمزگذارها";
    EncoderYieldHelp => "Cards personalised and blanks spoiled per encoder, from the cards table (all time).", "کارت‌های شخصی‌سازی‌شده و کارت‌های خام خراب‌شده برای هر رمزگذار، از جدول کارت‌ها (از آغاز).";
    NoCards => "No card has been personalised yet.", "هنوز هیچ کارتی شخصی‌سازی نشده است.";
    Overall => "overall", "کل";
    Overdue => "Cards overdue against the service level", "کارت‌های دیرکرد نسبت به سطح خدمت";
    OverdueHelp => "Applications received more than 15 days / more than a month (30 days) ago whose card has not reached a pickup office, still being worked on.", "درخواست‌هایی که بیش از ۱۵ روز / بیش از یک ماه (۳۰ روز) پیش دریافت شده‌اند و کارتشان هنوز به دفتر تحویل نرسیده است و همچنان در جریان‌اند.";
    Over15Days => "over 15 days", "بیش از ۱۵ روز";
    Over1Month => "over 1 month", "بیش از یک ماه";
    AsOf => "As of", "تا";
    // Application states (English: the stored name, as in logs, metrics and `cardpipe ops`)
    StReceived => "received", "دریافت‌شده";
    StRejected => "rejected", "ردشده";
    StDedupPending => "dedup_pending", "در انتظار تکرارزدایی";
    StDedupClear => "dedup_clear", "بدون تکرار";
    StPossibleDuplicate => "possible_duplicate", "تکراری احتمالی";
    StConfirmedDuplicate => "confirmed_duplicate", "تکراری تأییدشده";
    StCleared => "cleared", "پاک‌شده در داوری";
    StKeysIssued => "keys_issued", "کلیدها صادر شد";
    StPersonalized => "personalized", "شخصی‌سازی‌شده";
    StQcPassed => "qc_passed", "قبول در کنترل کیفیت";
    StQcFailed => "qc_failed", "رد در کنترل کیفیت";
    StReprintRequested => "reprint_requested", "چاپ دوباره درخواست‌شده";
    StPacked => "packed", "بسته‌بندی‌شده";
    StShipped => "shipped", "ارسال‌شده";
    StAtOffice => "at_office", "در دفتر تحویل";
    StInTransit => "in_transit", "در راه دفتر دیگر";
    StCollected => "collected", "تحویل‌شده به متقاضی";
    StVoided => "voided", "باطل‌شده";
    StCancelled => "cancelled", "لغوشده";
}

/// The name of an application state (`received`, …) in both languages, if it is one.
pub fn state_name(code: &str) -> Option<Msg> {
    Some(match code {
        "received" => Msg::StReceived,
        "rejected" => Msg::StRejected,
        "dedup_pending" => Msg::StDedupPending,
        "dedup_clear" => Msg::StDedupClear,
        "possible_duplicate" => Msg::StPossibleDuplicate,
        "confirmed_duplicate" => Msg::StConfirmedDuplicate,
        "cleared" => Msg::StCleared,
        "keys_issued" => Msg::StKeysIssued,
        "personalized" => Msg::StPersonalized,
        "qc_passed" => Msg::StQcPassed,
        "qc_failed" => Msg::StQcFailed,
        "reprint_requested" => Msg::StReprintRequested,
        "packed" => Msg::StPacked,
        "shipped" => Msg::StShipped,
        "at_office" => Msg::StAtOffice,
        "in_transit" => Msg::StInTransit,
        "collected" => Msg::StCollected,
        "voided" => Msg::StVoided,
        "cancelled" => Msg::StCancelled,
        _ => return None,
    })
}

/// "job J sent back to S as job N".
pub fn job_retried(lang: Lang, job: &str, stage: &str, new: &str) -> String {
    match lang {
        Lang::En => format!("job {job} sent back to {stage} as job {new}"),
        Lang::Fa => format!("کار {job} به‌عنوان کار {new} به مرحلهٔ {stage} بازگردانده شد"),
    }
}

/// "job J of A dropped".
pub fn job_dropped(lang: Lang, job: &str, subject: &str) -> String {
    match lang {
        Lang::En => format!("job {job} of {subject} dropped"),
        Lang::Fa => format!("کار {job} از {subject} کنار گذاشته شد"),
    }
}

/// "job J force-failed: application is now S".
pub fn job_failed(lang: Lang, job: &str, state: &str) -> String {
    match lang {
        Lang::En => format!("job {job} force-failed: application is now {state}"),
        Lang::Fa => format!("کار {job} به‌اجبار شکست خورد: درخواست اکنون {state} است"),
    }
}

/// "dead letter N (T for S) re-queued / discarded".
pub fn dead_letter_done(
    lang: Lang,
    seq: i64,
    topic: &str,
    subject: &str,
    requeued: bool,
) -> String {
    match (lang, requeued) {
        (Lang::En, true) => format!("dead letter {seq} ({topic} for {subject}) re-queued"),
        (Lang::En, false) => format!("dead letter {seq} ({topic} for {subject}) discarded"),
        (Lang::Fa, true) => format!(
            "نامهٔ مرده {} ({topic} برای {subject}) به صف بازگشت",
            persian_digits(&seq.to_string())
        ),
        (Lang::Fa, false) => format!(
            "نامهٔ مرده {} ({topic} برای {subject}) دور ریخته شد",
            persian_digits(&seq.to_string())
        ),
    }
}

/// "encoder E returned to service / taken out of service".
pub fn encoder_done(lang: Lang, encoder: &str, in_service: bool) -> String {
    match (lang, in_service) {
        (Lang::En, true) => format!("encoder {encoder} returned to service"),
        (Lang::En, false) => format!("encoder {encoder} taken out of service"),
        (Lang::Fa, true) => format!("رمزگذار {encoder} به سرویس بازگشت"),
        (Lang::Fa, false) => format!("رمزگذار {encoder} از سرویس خارج شد"),
    }
}

/// "decided: S (dedup applies it)".
pub fn decided(lang: Lang, state: &str) -> String {
    match lang {
        Lang::En => format!("decided: {state} (dedup applies it)"),
        Lang::Fa => format!("تصمیم گرفته شد: {state} (مرحلهٔ تکرارزدایی آن را اعمال می‌کند)"),
    }
}

/// "discrepancy D resolved: R (reprint P requested)".
pub fn discrepancy_resolved(
    lang: Lang,
    id: &str,
    resolution: &str,
    reprint: Option<&str>,
) -> String {
    match lang {
        Lang::En => format!(
            "discrepancy {id} resolved: {resolution}{}",
            reprint
                .map(|r| format!(" (reprint {r} requested)"))
                .unwrap_or_default()
        ),
        Lang::Fa => format!(
            "مغایرت {id} رسیدگی شد: {resolution}{}",
            reprint
                .map(|r| format!(" (چاپ دوباره {r} درخواست شد)"))
                .unwrap_or_default()
        ),
    }
}

/// "Undelivered messages (N dead letters)".
pub fn dead_letters_heading(lang: Lang, n: usize) -> String {
    match lang {
        Lang::En => format!("Undelivered messages ({n} dead letters)"),
        Lang::Fa => format!(
            "پیام‌های تحویل‌نشده ({} نامهٔ مرده)",
            persian_digits(&n.to_string())
        ),
    }
}

/// "Office discrepancies (N open)".
pub fn discrepancies_heading(lang: Lang, open: usize) -> String {
    match lang {
        Lang::En => format!("Office discrepancies ({open} open)"),
        Lang::Fa => format!(
            "مغایرت‌های دفاتر ({} باز)",
            persian_digits(&open.to_string())
        ),
    }
}

/// "too many failed logins for this account; try again in N seconds".
pub fn rate_limited(lang: Lang, seconds: u64) -> String {
    match lang {
        Lang::En => {
            format!("too many failed logins for this account; try again in {seconds} seconds")
        }
        Lang::Fa => format!(
            "ورودهای ناموفق این حساب زیاد است؛ {} ثانیهٔ دیگر دوباره تلاش کنید",
            persian_digits(&seconds.to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn every_key_has_both_texts() {
        assert!(Msg::ALL.len() > 100);
        for m in Msg::ALL {
            let (en, fa) = (m.text(Lang::En), m.text(Lang::Fa));
            assert!(!en.trim().is_empty(), "{m:?} has no English text");
            assert!(!fa.trim().is_empty(), "{m:?} has no Persian text");
            // Persian texts are in Persian script (a few keep a Latin name or code in them).
            assert!(
                fa.chars().any(|c| ('\u{0600}'..='\u{06FF}').contains(&c)),
                "{m:?}: {fa:?} is not Persian"
            );
            assert!(
                !en.chars().any(|c| ('\u{0600}'..='\u{06FF}').contains(&c)),
                "{m:?}: {en:?} is not English"
            );
        }
    }

    #[test]
    fn every_application_state_has_a_name() {
        for state in cardpipe_common::domain::state::ALL_STATES {
            let m = state_name(state.as_str()).unwrap_or_else(|| panic!("{state:?}"));
            assert_eq!(m.text(Lang::En), state.as_str());
        }
        assert_eq!(state_name("no_such_state"), None);
    }

    #[test]
    fn persian_digits_percentages_and_directions() {
        assert_eq!(Lang::Fa.num(1234567890), "۱۲۳۴۵۶۷۸۹۰");
        assert_eq!(Lang::En.num(42), "42");
        assert_eq!(Lang::Fa.percent(0.975), "٪۹۷٫۵");
        assert_eq!(Lang::En.percent(0.975), "97.5%");
        assert_eq!((Lang::Fa.dir(), Lang::En.dir()), ("rtl", "ltr"));
        assert_eq!(Lang::default(), Lang::Fa);
    }

    #[test]
    fn solar_hijri_dates_in_tehran_time() {
        // 2024-03-19 20:45 UTC is 00:15 on 2024-03-20 in Tehran: 1 Farvardin 1403 (Nowruz).
        let at = datetime!(2024-03-19 20:45 UTC);
        assert_eq!(Lang::Fa.datetime(at), "۱۴۰۳/۰۱/۰۱ ۰۰:۱۵");
        assert_eq!(Lang::En.datetime(at), "2024-03-20 00:15 Tehran");
        // One minute earlier than midnight in Tehran is still the last day of 1402.
        assert_eq!(
            Lang::Fa.datetime(datetime!(2024-03-19 20:29 UTC)),
            "۱۴۰۲/۱۲/۲۹ ۲۳:۵۹"
        );
        assert_eq!(
            Lang::Fa.stored_time("2026-12-06T12:00:00.000000Z"),
            "۱۴۰۵/۰۹/۱۵ ۱۵:۳۰"
        );
        assert_eq!(Lang::En.stored_time("not a time"), "not a time");
        assert_eq!(Lang::Fa.hour(at), "۰۰");
    }

    #[test]
    fn language_cookie_values_round_trip() {
        for lang in [Lang::Fa, Lang::En] {
            assert_eq!(Lang::from_code(Some(lang.code())), lang);
            assert_eq!(lang.other().other(), lang);
        }
        assert_eq!(Lang::from_code(None), Lang::Fa);
        assert_eq!(Lang::from_code(Some("de")), Lang::Fa);
    }

    #[test]
    fn back_stays_inside_the_console() {
        for ok in [
            "/console",
            "/console/",
            "/console/audit?subject=x",
            "/console/applications/app-1",
        ] {
            assert_eq!(safe_back(Some(ok)), ok);
        }
        for bad in [
            "//evil.example/console/",
            "https://evil.example/console/",
            "/console//evil.example",
            "/\\evil.example",
            "/console/\\evil",
            "/consolex",
            "/metrics",
            "/console/../metrics",
            "console/",
            "/console/\r\nSet-Cookie: x=1",
            "",
        ] {
            assert_eq!(safe_back(Some(bad)), "/console/", "{bad:?}");
        }
        assert_eq!(safe_back(None), "/console/");
    }
}

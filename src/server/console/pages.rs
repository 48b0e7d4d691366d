//! The console's pages (maud: every value is HTML-escaped unless marked otherwise, and nothing
//! here marks one). No inline script or style: the Content-Security-Policy allows neither (the
//! events page loads the console's one script file).
//! Secrets are never rendered: credential inputs are password fields that start empty.

use maud::{html, Markup, DOCTYPE};

use super::forms::{self, Input};
use crate::model::{CredentialType, SystemKind};
use crate::pb;

/// What every signed-in page needs: who is signed in and the CSRF token for its forms.
pub struct Ctx<'a> {
    /// The caller's name.
    pub name: &'a str,
    /// The session's CSRF token.
    pub csrf: &'a str,
}

/// A notice at the top of a page: worded so that colour is not needed to read it.
pub enum Notice {
    /// Something worked.
    Done(String),
    /// Something failed (nothing was changed unless it says so).
    Failed(String),
}

fn notice(n: Option<&Notice>) -> Markup {
    match n {
        Some(Notice::Done(m)) => html! { p.notice.done role="status" { strong { "Done: " } (m) } },
        Some(Notice::Failed(m)) => {
            html! { p.notice.failed role="alert" { strong { "Error: " } (m) } }
        }
        None => html! {},
    }
}

/// A whole page.
pub fn layout(title: &str, ctx: Option<&Ctx<'_>>, note: Option<&Notice>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " – credbroker console" }
                link rel="stylesheet" href="/console/assets/console.css";
            }
            body {
                header {
                    a.brand href="/console/systems" { "credbroker" }
                    @if let Some(c) = ctx {
                        nav aria-label="Main" {
                            a href="/console/systems" { "Systems" }
                            a href="/console/register" { "Register" }
                            a href="/console/callers" { "Callers" }
                            a href="/console/keys" { "Keys" }
                            a href="/console/events" { "Events" }
                        }
                        form.signout method="post" action="/console/sign-out" {
                            (csrf(c))
                            span { "Signed in as " strong { (c.name) } }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (notice(note)) (body) }
            }
        }
    }
}

fn csrf(c: &Ctx<'_>) -> Markup {
    html! { input type="hidden" name="csrf" value=(c.csrf); }
}

/// The sign-in page.
pub fn sign_in(note: Option<&Notice>, certificate_admin: Option<&str>) -> Markup {
    let body = html! {
        @if let Some(name) = certificate_admin {
            form method="post" action="/console/sign-in" {
                input type="hidden" name="certificate" value="1";
                button #certificate type="submit" { "Sign in as " (name) " with your client certificate" }
            }
            p { "Or:" }
        }
        p { "Sign in with an admin caller token (" code { "credbrokerctl caller create --role admin" } "). Worker tokens cannot sign in." }
        form method="post" action="/console/sign-in" {
            label for="token" { "Admin caller token" }
            input #token type="password" name="token" autocomplete="off" required autofocus;
            button type="submit" { "Sign in" }
        }
    };
    layout("Sign in", None, note, body)
}

/// A page with a message only.
pub fn message(title: &str, ctx: Option<&Ctx<'_>>, text: &str) -> Markup {
    layout(
        title,
        ctx,
        None,
        html! { p { (text) } p { a href="/console/systems" { "Back to the systems" } } },
    )
}

fn kind_of(v: i32) -> Option<SystemKind> {
    crate::server::convert::kind(v, "kind").ok()
}

/// The kind's name for people.
pub fn kind_name(v: i32) -> &'static str {
    kind_of(v).map_or("unknown", SystemKind::display_name)
}

fn state_name(v: i32) -> &'static str {
    match pb::SystemState::try_from(v) {
        Ok(pb::SystemState::Active) => "active",
        Ok(pb::SystemState::AuthorizationPending) => "not connected yet",
        Ok(pb::SystemState::ReauthorizationRequired) => "needs re-authorization",
        _ => "unknown",
    }
}

/// A proto health for people.
pub fn health_name(v: i32) -> &'static str {
    match pb::SystemHealth::try_from(v) {
        Ok(pb::SystemHealth::Healthy) => "healthy",
        Ok(pb::SystemHealth::Expiring) => "expiring",
        Ok(pb::SystemHealth::Degraded) => "degraded",
        Ok(pb::SystemHealth::Failing) => "failing",
        _ => "unknown",
    }
}

fn delivery_name(v: i32) -> &'static str {
    match pb::Delivery::try_from(v) {
        Ok(pb::Delivery::Proxy) => "proxy",
        _ => "header",
    }
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        Some(t) if t.seconds > 0 => crate::util::time::date_time(t.seconds as u64),
        _ => "never".to_owned(),
    }
}

fn countdown(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t.filter(|t| t.seconds > 0) else {
        return "no known expiry".to_owned();
    };
    let left = t.seconds - crate::model::unix_now() as i64;
    match left {
        l if l <= 0 => "expired".to_owned(),
        l if l < 86_400 => format!("in {} h", (l + 3599) / 3600),
        l => format!("in {} days", (l + 86_399) / 86_400),
    }
}

/// The systems table, with its filter; `cut` (rows shown at most, systems read at most) when
/// not every match is shown.
pub fn systems(
    ctx: &Ctx<'_>,
    list: &[pb::System],
    kind: &str,
    state: &str,
    cut: Option<(usize, usize)>,
) -> Markup {
    let body = html! {
        form.filter method="get" action="/console/systems" {
            label for="kind" { "Kind" }
            select #kind name="kind" {
                option value="" { "any" }
                @for k in SystemKind::ALL {
                    option value=(k.slug()) selected[kind == k.slug()] { (k.display_name()) }
                }
            }
            label for="state" { "State" }
            select #state name="state" {
                option value="" { "any" }
                @for (v, s) in [("active", "active"), ("pending", "not connected yet"), ("reauth", "needs re-authorization")] {
                    option value=(v) selected[state == v] { (s) }
                }
            }
            button type="submit" { "Filter" }
        }
        @if list.is_empty() {
            p { "No systems match. " a href="/console/register" { "Register one" } "." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "System" } th scope="col" { "Kind" } th scope="col" { "State" }
                    th scope="col" { "Health" } th scope="col" { "Delivery" } th scope="col" { "Credential version" }
                    th scope="col" { "Expires" } th scope="col" { "Last check" }
                } }
                tbody { @for s in list { (system_row(s)) } }
            }
        }
        @if let Some((rows, read)) = cut {
            p { "Not every system is shown: at most " (rows) " rows, among the first " (read) " systems. Narrow the filter, or use " code { "credbrokerctl system list" } "." }
        }
    };
    layout("Systems", Some(ctx), None, body)
}

fn system_row(s: &pb::System) -> Markup {
    let check = s.last_check.as_ref();
    html! {
        tr {
            td { a href={ "/console/systems/" (s.system_id) } { (s.system_id) } }
            td { (kind_name(s.kind)) }
            td { (state_name(s.state)) }
            td { (health_name(s.health)) @if !s.health_reason.is_empty() { br; small { (s.health_reason) } } }
            td { (delivery_name(s.delivery)) }
            td { (s.credential_version) }
            td { (countdown(s.credential_expires_at.as_ref())) }
            td {
                @match check {
                    Some(c) => { (if c.ok { "passed" } else { "failed" }) ", " (when(c.checked_at.as_ref())) }
                    None => { "never" }
                }
            }
        }
    }
}

/// A system's recent past: its events held in memory, and its audit lines (`None`: no file).
pub struct Past<'a> {
    /// Newest first.
    pub events: &'a [std::sync::Arc<crate::broker::events::Event>],
    /// Newest first.
    pub audit: Option<&'a [super::history::AuditLine]>,
}

fn past(p: &Past<'_>) -> Markup {
    html! {
        h2 { "Recent events" }
        @if p.events.is_empty() {
            p { "None since this broker started (or within its last 4,096 events)." }
        } @else {
            table {
                thead { tr { th scope="col" { "When" } th scope="col" { "Event" } th scope="col" { "Health" } th scope="col" { "Detail" } } }
                tbody { @for e in p.events {
                    tr {
                        td { (crate::util::time::date_time(e.at)) }
                        td { (e.kind.as_str()) }
                        td { (e.system.health.as_ref().map_or("", |h| h.health.as_str())) }
                        td { (e.detail) }
                    }
                } }
            }
        }
        h2 { "Audit trail" }
        @match p.audit {
            None => p { "The audit trail is not written to a file here (see CREDBROKER_AUDIT_FILE)." },
            Some([]) => p { "No audit lines about this system in the trail's newest part." },
            Some(lines) => table {
                thead { tr { th scope="col" { "When" } th scope="col" { "Call" } th scope="col" { "Caller" } th scope="col" { "Outcome" } } }
                tbody { @for l in lines { tr { td { (l.time) } td { (l.rpc) } td { (l.caller) } td { (l.code) } } } }
            },
        }
    }
}

/// One system: its state, its last check, what an admin can do to it, and its recent past.
pub fn system(ctx: &Ctx<'_>, s: &pb::System, note: Option<&Notice>, history: &Past<'_>) -> Markup {
    let ct = crate::server::convert::credential_type(s.credential_type);
    let body = html! {
        dl {
            dt { "Kind" } dd { (kind_name(s.kind)) }
            dt { "Display name" } dd { (s.display_name) }
            dt { "Base URL" } dd { (s.base_url) }
            dt { "Credential type" } dd { (ct.map_or("unknown", CredentialType::field_name)) }
            dt { "Credential version" } dd { (s.credential_version) }
            dt { "State" } dd { (state_name(s.state)) @if !s.state_message.is_empty() { " – " (s.state_message) } }
            dt { "Health" } dd { (health_name(s.health)) @if !s.health_reason.is_empty() { " – " (s.health_reason) } " (since " (when(s.health_since.as_ref())) ")" }
            dt { "Delivery" } dd { (delivery_name(s.delivery)) }
            dt { "Credential expires" } dd { (countdown(s.credential_expires_at.as_ref())) }
        }
        h2 { "Last check" }
        (check(s.last_check.as_ref()))
        h2 { "Actions" }
        (actions(ctx, s, ct))
        (past(history))
    };
    layout(&format!("System {}", s.system_id), Some(ctx), note, body)
}

/// A check's outcome in plain words.
pub fn check(c: Option<&pb::AuthCheck>) -> Markup {
    let Some(c) = c else {
        return html! { p { "Not checked yet." } };
    };
    html! {
        div.check {
            p { strong { (if c.ok { "Passed" } else { "Failed" }) } " (" (when(c.checked_at.as_ref())) "): " (c.message) }
            @if let Some(i) = &c.identity {
                p { "Authenticates as " strong { (i.display_name) } @if !i.email.is_empty() { " <" (i.email) ">" } " (id " (i.id) ")" }
            }
            @if !c.missing_permissions.is_empty() {
                p { "Missing permissions:" }
                ul { @for m in &c.missing_permissions { li { (m) } } }
            }
        }
    }
}

fn actions(ctx: &Ctx<'_>, s: &pb::System, ct: Option<CredentialType>) -> Markup {
    let base = format!("/console/systems/{}", s.system_id);
    html! {
        form method="post" action={ (base) "/check" } { (csrf(ctx)) button type="submit" { "Check now" } }
        @if ct == Some(CredentialType::OAuthAuthorizationCode) {
            form method="post" action={ (base) "/connect" } {
                (csrf(ctx))
                button type="submit" { (if s.state == pb::SystemState::Active as i32 { "Reconnect" } else { "Connect" }) }
            }
        }
        form method="post" action={ (base) "/delivery" } {
            (csrf(ctx))
            label for="delivery" { "Delivery" }
            select #delivery name="delivery" {
                option value="header" selected[s.delivery != pb::Delivery::Proxy as i32] { "header" }
                option value="proxy" selected[s.delivery == pb::Delivery::Proxy as i32] { "proxy" }
            }
            button type="submit" { "Switch delivery" }
        }
        @if let Some(t) = ct {
            form method="post" action={ (base) "/rotate" } {
                (csrf(ctx))
                fieldset {
                    legend { "Rotate: a new " (t.field_name()) }
                    (credential_inputs(t))
                    label { input type="checkbox" name="skip_check"; " Skip the check" }
                }
                button type="submit" { "Rotate" }
            }
        }
        form method="post" action={ (base) "/delete" } {
            (csrf(ctx))
            label for="confirm" { "Type the system id to delete it" }
            input #confirm type="text" name="confirm" autocomplete="off" required;
            button.danger type="submit" { "Delete" }
        }
    }
}

/// The inputs of credential type `t`; every secret starts empty and is a password input.
pub fn credential_inputs(t: CredentialType) -> Markup {
    html! {
        @for f in forms::fields(t) {
            @match f.input {
                Input::Text | Input::List => {
                    label for=(f.name) { (f.label) }
                    input id=(f.name) type="text" name=(f.name) autocomplete="off";
                }
                Input::Secret => {
                    label for=(f.name) { (f.label) }
                    input id=(f.name) type="password" name=(f.name) autocomplete="new-password";
                }
                Input::SecretBlock => {
                    label for=(f.name) { (f.label) }
                    textarea id=(f.name) name=(f.name) rows="4" autocomplete="off" spellcheck="false" {}
                }
                Input::Flag => {
                    label { input type="checkbox" name=(f.name); " " (f.label) }
                }
            }
        }
    }
}

/// What the register form keeps when it is shown again (never a secret).
#[derive(Default)]
pub struct Kept {
    /// System id.
    pub system_id: String,
    /// Display name.
    pub display_name: String,
    /// Base URL.
    pub base_url: String,
    /// Description.
    pub description: String,
}

/// Registration: pick a kind, then a credential type, then fill that type's form.
pub fn register(
    ctx: &Ctx<'_>,
    kind: Option<SystemKind>,
    t: Option<CredentialType>,
    kept: &Kept,
    note: Option<&Notice>,
) -> Markup {
    let body = match (kind, t) {
        (None, _) => html! {
            p { "Which system?" }
            ul.choices { @for k in SystemKind::ALL { li { a href={ "/console/register?kind=" (k.slug()) } { (k.display_name()) } } } }
        },
        (Some(k), None) => html! {
            p { (k.display_name()) ": which credential?" }
            ul.choices { @for c in k.accepted_credentials() {
                li { a href={ "/console/register?kind=" (k.slug()) "&type=" (c.field_name()) } { (c.field_name()) } }
            } }
        },
        (Some(k), Some(t)) => register_form(ctx, k, t, kept),
    };
    layout("Register a system", Some(ctx), note, body)
}

fn register_form(ctx: &Ctx<'_>, k: SystemKind, t: CredentialType, kept: &Kept) -> Markup {
    html! {
        form method="post" action="/console/register" {
            (csrf(ctx))
            input type="hidden" name="kind" value=(k.slug());
            input type="hidden" name="type" value=(t.field_name());
            p { (k.display_name()) " with " (t.field_name()) " (" a href={ "/console/register?kind=" (k.slug()) } { "change" } ")" }
            label for="system_id" { "System id (empty: generated)" }
            input #system_id type="text" name="system_id" value=(kept.system_id) autocomplete="off";
            label for="display_name" { "Display name" }
            input #display_name type="text" name="display_name" value=(kept.display_name);
            label for="base_url" { "Base URL (the vendor's instance)" }
            input #base_url type="url" name="base_url" value=(kept.base_url);
            label for="description" { "Description" }
            input #description type="text" name="description" value=(kept.description);
            fieldset { legend { "Credential" } (credential_inputs(t)) }
            label for="delivery" { "Delivery" }
            select #delivery name="delivery" { option value="" { "the deployment's default" } option value="header" { "header" } option value="proxy" { "proxy" } }
            label { input type="checkbox" name="check" checked; " Check the credential before saving" }
            button type="submit" { "Register" }
        }
    }
}

/// The callers, a form to create one, and a new caller's token (shown on this page only).
pub fn callers(
    ctx: &Ctx<'_>,
    list: &[pb::Caller],
    created: Option<(&str, &str)>,
    note: Option<&Notice>,
) -> Markup {
    let body = html! {
        @if let Some((name, token)) = created {
            section.created aria-labelledby="created" {
                h2 #created { "Token of " (name) }
                p { "Copy it now: it is shown once, here only." }
                output #new-token { (token) }
            }
        }
        table {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Role" } th scope="col" { "Created" } th scope="col" { "Expires" } th scope="col" { "Status" } th scope="col" { "Action" } } }
            tbody { @for c in list {
                tr {
                    td { (c.name) }
                    td { (if c.role == pb::CallerRole::Admin as i32 { "admin" } else { "worker" }) }
                    td { (when(c.created_at.as_ref())) }
                    td { (countdown(c.expires_at.as_ref())) }
                    td { (if c.revoked { "revoked" } else { "active" }) }
                    td { @if !c.revoked {
                        form method="post" action={ "/console/callers/" (c.name) "/revoke" } {
                            (csrf(ctx)) button type="submit" aria-label={ "Revoke " (c.name) } { "Revoke" }
                        }
                    } }
                }
            } }
        }
        h2 { "Create a caller" }
        form method="post" action="/console/callers" {
            (csrf(ctx))
            label for="name" { "Name" }
            input #name type="text" name="name" required autocomplete="off";
            label for="role" { "Role" }
            select #role name="role" { option value="worker" { "worker" } option value="admin" { "admin" } }
            label for="patterns" { "Workers: system id patterns (space-separated; empty: all)" }
            input #patterns type="text" name="patterns" autocomplete="off";
            button type="submit" { "Create" }
        }
    };
    layout("Callers", Some(ctx), note, body)
}

/// The live events view (its one script fills the table from `/console/events/stream`).
pub fn events(ctx: &Ctx<'_>) -> Markup {
    let body = html! {
        p #events-status role="status" { "Connecting to the live feed… (it needs JavaScript; `credbrokerctl system watch` shows the same)" }
        table {
            thead { tr { th scope="col" { "When" } th scope="col" { "Event" } th scope="col" { "System" } th scope="col" { "Health" } th scope="col" { "Detail" } } }
            tbody #events-body aria-live="polite" {}
        }
        script src="/console/assets/console.js" {}
    };
    layout("Events", Some(ctx), None, body)
}

/// The master keys and the re-wrap's progress.
pub fn keys(ctx: &Ctx<'_>, k: &pb::GetKeyStatusResponse, note: Option<&Notice>) -> Markup {
    let body = html! {
        p { "Primary key: " code { (k.primary_key_id) } }
        p { "Records on the primary key: " (k.records_on_primary) " of " (k.records_total)
            (if k.rewrap_running { " (re-wrapping now)" } else { "" }) }
        table {
            thead { tr { th scope="col" { "Key" } th scope="col" { "Primary" } th scope="col" { "Records" } } }
            tbody { @for i in &k.keys { tr { td { code { (i.key_id) } } td { (if i.primary { "yes" } else { "no" }) } td { (i.records) } } } }
        }
        form method="post" action="/console/keys/rotate" {
            (csrf(ctx))
            button type="submit" { "Rotate the master key" }
        }
    };
    layout("Keys", Some(ctx), note, body)
}

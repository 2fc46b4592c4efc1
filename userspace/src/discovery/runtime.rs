//! Following the container runtime over the Docker Engine API ([`super::api`]): the containers
//! at connect, then their events; every container inspected when created or started, or when
//! the pipe source sees it write first. Reconnects with backoff; a fresh list picks up what
//! happened meanwhile.

use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::api::{Api, Event, Inspect};
use super::identity::{Described, Identity};
use super::{Discovery, Entry, Listener};
use crate::api::Stdout;

/// Backoff between connection attempts: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

pub async fn follow(d: Arc<Discovery>, mut asked: mpsc::Receiver<String>, listener: Arc<dyn Listener>) {
    let mut backoff = BACKOFF.0;
    loop {
        let mut connected = false;
        let reason = match session(&d, &*listener, &mut asked, &mut connected).await {
            Ok(()) => "the runtime closed the event stream".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if connected {
            backoff = BACKOFF.0;
            warn!(socket = %d.config.docker_socket.display(), "lost the container runtime: {reason}");
        } else {
            debug!(socket = %d.config.docker_socket.display(), "cannot reach the container runtime: {reason}");
        }
        d.set_status("disconnected", Some(reason));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// One connection: list, then events and inspections until the runtime goes away.
async fn session(
    d: &Discovery,
    l: &dyn Listener,
    asked: &mut mpsc::Receiver<String>,
    connected: &mut bool,
) -> anyhow::Result<()> {
    let api = Api::connect(&d.config.docker_socket).await?;
    // Events from a little before the list on, so that nothing between the two is missed
    // (seen twice is harmless: every event is handled idempotently).
    let since = SystemTime::now().duration_since(UNIX_EPOCH).map(|t| t.as_secs().saturating_sub(1)).unwrap_or(0);
    let mut events = api.events(since).await?;
    let listed: Vec<String> = api.containers().await?.into_iter().map(|c| c.id).collect();
    d.lock().api_version = Some(api.version.clone());
    *connected = true;
    d.set_status("connected", None);
    info!(socket = %d.config.docker_socket.display(), containers = listed.len(), "following the container runtime");
    // Containers removed while we were away.
    let stale: Vec<String> = d.lock().containers.keys().filter(|id| !listed.contains(id)).cloned().collect();
    for id in stale {
        d.removed(&id, l);
    }
    for id in listed.iter().chain(d.still_asked().iter()) {
        describe(d, l, &api, id).await?;
    }
    loop {
        tokio::select! {
            event = events.next() => match event? {
                None => return Ok(()),
                Some(event) => on_event(d, l, &api, event).await?,
            },
            Some(id) = asked.recv() => describe(d, l, &api, &id).await?,
        }
    }
}

async fn on_event(d: &Discovery, l: &dyn Listener, api: &Api, event: Event) -> anyhow::Result<()> {
    if event.kind != "container" || event.actor.id.is_empty() {
        return Ok(());
    }
    let id = event.actor.id.as_str();
    d.lock().events += 1;
    debug!(action = %event.action, id, "container event");
    match event.action.as_str() {
        "create" | "start" | "restart" | "rename" | "update" => describe(d, l, api, id).await?,
        "die" | "died" => d.died(id, l),
        // Podman says `remove` where Docker says `destroy`.
        "destroy" | "remove" => d.removed(id, l),
        _ => {}
    }
    Ok(())
}

/// Inspects a container into the registry; one the runtime does not know is answered as
/// unknown. An error (the runtime gone) ends the session.
async fn describe(d: &Discovery, l: &dyn Listener, api: &Api, id: &str) -> anyhow::Result<()> {
    match api.inspect(id).await? {
        Some(info) => {
            let mut e = entry(d, &info, id);
            if e.stdout == Stdout::Captured && info.state.running && e.pid > 0 {
                if let Some(why) = not_a_pipe(e.pid).await {
                    warn!(container = %e.identity.container.name, "stdout/stderr not capturable: {why}");
                    e.stdout = Stdout::NotCapturable;
                    e.reason = Some(why);
                }
            }
            d.described(e, l)
        }
        None => d.unknown(id, l),
    }
    Ok(())
}

fn entry(d: &Discovery, info: &Inspect, id: &str) -> Entry {
    let c = &info.config;
    let described = Described {
        id: if info.id.is_empty() { id } else { &info.id },
        name: &info.name,
        image: if c.image.is_empty() { &info.image } else { &c.image },
        labels: &c.labels,
        env: &c.env,
    };
    let identity = Identity::of(&described, &d.config.labels);
    let pid = u32::try_from(info.state.pid).unwrap_or(0);
    let (stdout, reason) = if !identity.stdout {
        (Stdout::OptedOut, None)
    } else if c.tty {
        let why = "the container has a tty (-t): its output goes to a terminal, not a pipe";
        warn!(container = %identity.container.name, "stdout/stderr not capturable: {why}");
        (Stdout::NotCapturable, Some(why.into()))
    } else {
        (Stdout::Captured, None)
    };
    let mut volumes: Vec<String> = info
        .mounts
        .iter()
        .filter_map(|m| d.volume_of(&m.source).or_else(|| (m.driver == "logtap").then(|| m.name.clone())))
        .collect();
    volumes.sort();
    volumes.dedup();
    Entry { identity: Arc::new(identity), state: info.state.status.clone(), pid, stdout, reason, volumes }
}

/// Why a running container's stdout or stderr is no pipe (the only thing the eBPF programs
/// capture), or `None` when both are pipes or FIFOs. A shell redirects its own fds for a
/// moment (`echo x >> file`), so it takes three looks 20 ms apart that all find no pipe.
async fn not_a_pipe(pid: u32) -> Option<String> {
    for look in 1..=3 {
        let why = [1, 2].into_iter().find_map(|fd| {
            let link = format!("/proc/{pid}/fd/{fd}");
            let target = std::fs::read_link(&link).ok()?;
            let is_pipe = std::fs::metadata(&link).is_ok_and(|m| m.file_type().is_fifo());
            let name = if fd == 1 { "stdout" } else { "stderr" };
            (!is_pipe).then(|| format!("its {name} is {}, not a pipe", target.display()))
        });
        if why.is_none() || look == 3 {
            return why;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

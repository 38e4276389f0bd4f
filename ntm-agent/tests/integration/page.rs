//! The live page (`GET /`) in a real headless Chromium, while known traffic
//! flows in a test namespace: the devices, servers and totals it shows
//! equal what was sent and what `/metrics` says; host names that are
//! markup show as text and run nothing; the browser's console has no
//! errors and it asked nothing of any host but the agent.

use std::{collections::HashMap, net::UdpSocket, time::Duration};

use serde_json::Value;

use crate::kit::{
    A4, Agent, B4, Link,
    browser::Browser,
    dns::{Answer, DnsServer},
    scrape::{TempDir, http_get, sample_sum, wait_for, wait_healthy},
};

const PORT: u16 = 9440;
const DRIVER_PORT: u16 = 9441;

/// Host names that are markup, as a hosts file can give them (without
/// whitespace: a name with a space is not taken from a file or a DHCP
/// message).
const HOSTILE_DEVICE: &str = "<img/src='x'/onerror=alert(1)>";
const HOSTILE_SERVER: &str = "\"><svg/onload=alert(2)>";
const HOSTILE_DEVICE_IP: &str = "198.18.0.3";
const HOSTILE_SERVER_IP: &str = "198.18.0.4";
/// The name the test's DNS server gives 198.18.0.5 (reverse DNS), with
/// its spaces: it arrives as the resolver writes a DNS name's special
/// characters, escaped as in a zone file.
const HOSTILE_PTR_IP: &str = "198.18.0.5";
const HOSTILE_PTR: &str = "<img src=x onerror=alert(1)>";
const HOSTILE_PTR_SHOWN: &str = r"\<img\040src\=x\040onerror\=alert\(1\)\>";
const DNS_PORT: u16 = 5357;

/// The page's byte figures, as `page.js` writes them (decimal units,
/// three figures).
fn shown(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let (mut n, mut i) = (bytes as f64, 0);
    while n >= 1000.0 && i < UNITS.len() - 1 {
        n /= 1000.0;
        i += 1;
    }
    if i == 0 {
        return format!("{bytes} B");
    }
    let digits = if n < 10.0 {
        2
    } else if n < 100.0 {
        1
    } else {
        0
    };
    format!("{n:.digits$} {}", UNITS[i])
}

/// A table's rows as the page shows them: each row's name (its
/// `data-name`), the text of its first cell, and each other cell's text
/// and exact byte count (where it has one).
fn table(browser: &Browser, id: &str) -> Vec<Value> {
    let script = format!(
        "return [...document.querySelectorAll('#{id} tbody tr')].map((tr) => ({{
           name: tr.dataset.name,
           first: tr.cells[0].firstChild.textContent,
           cells: [...tr.cells].slice(1).map((td) => ({{
             text: td.textContent,
             bytes: td.dataset.bytes === undefined ? null : Number(td.dataset.bytes),
           }})),
         }}));"
    );
    browser
        .script(&script)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn row<'a>(rows: &'a [Value], name: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["name"] == name)
}

/// The exact bytes and the text of cell `i` (after the name).
fn cell(row: &Value, i: usize) -> (Option<u64>, String) {
    let cell = &row["cells"][i];
    (
        cell["bytes"].as_u64(),
        cell["text"].as_str().unwrap_or("").to_string(),
    )
}

/// Bytes `name` sent and received, by /metrics (`src` or `dst` label).
fn metrics_of(metrics: &str, name: &str) -> (u64, u64) {
    let label = |l: &str| format!("{l}=\"{}\"", name.replace('\\', r"\\").replace('"', "\\\""));
    (
        sample_sum(metrics, "ntm_bytes_total", &[&label("dst")]),
        sample_sum(metrics, "ntm_bytes_total", &[&label("src")]),
    )
}

/// A laptop (198.18.0.2) and a device with a hostile name (198.18.0.3)
/// talk to the nas (198.18.0.1, the agent's host), to a server with a
/// hostile name (198.18.0.4) and to one that reverse DNS names
/// `<img src=x onerror=alert(1)>` (198.18.0.5). The page, loaded in
/// Chromium, shows each device's and server's totals for the run, today
/// and the billing period exactly as sent and as `/metrics` has them; picking the laptop shows
/// its servers only; the names show as text, no script of theirs runs;
/// the console has no errors; every request went to the agent; while the
/// agent is stopped the page says it does not answer, and it is up to date
/// again by itself once the agent goes on. Screenshots (wide and
/// phone-sized) are saved under the target directory.
pub fn the_page_shows_what_was_sent_and_names_as_text() {
    let link = Link::new("page");
    link.b.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{HOSTILE_DEVICE_IP}/24"),
        "dev",
        &link.b_if,
    ]);
    for ip in [HOSTILE_SERVER_IP, HOSTILE_PTR_IP] {
        link.a
            .exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &link.a_if]);
    }
    let _dns = DnsServer::start(
        &link.a,
        DNS_PORT,
        HashMap::from([(
            "5.0.18.198.in-addr.arpa",
            Answer::Name(HOSTILE_PTR, Duration::ZERO),
        )]),
    );
    let dir = TempDir::new("page");
    let hosts = dir.0.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "198.18.0.2 laptop\n198.18.0.1 nas\n{HOSTILE_DEVICE_IP} {HOSTILE_DEVICE}\n{HOSTILE_SERVER_IP} {HOSTILE_SERVER}\n"
        ),
    )
    .unwrap();
    let agent = Agent::in_ns(&link.a)
        .names(true)
        .iface(&link.a_if)
        .port(PORT)
        .args(["--local-net", "198.18.0.2/32,198.18.0.3/32"])
        .args(["--dns-server", &format!("127.0.0.1:{DNS_PORT}")])
        // Time enough for the reverse DNS name even on a loaded machine
        // (a flow exported before its name keeps its address).
        .args(["--drain-interval", "200ms", "--name-wait", "3s", "--no-pin"])
        .args(["--history-commit-interval", "1s"])
        .arg("--hosts-file")
        .arg(&hosts)
        .spawn();
    wait_healthy(&link.a, PORT);
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    link.a.run(|| {
        let browser = Browser::start(&link.a, DRIVER_PORT, (1280, 1400));
        let page = format!("http://127.0.0.1:{PORT}/");
        browser.goto(&page);
        // Loaded before any traffic: what follows arrives by the page's own
        // updates.
        wait_for("the page's first update", Duration::from_secs(10), || {
            (browser.text("#health") == "counting").then_some(())
        });
        assert_eq!(
            browser.script("return document.getElementById('devices-empty').hidden;"),
            false
        );

        // The laptop: 160 datagrams up to the nas, 60 down. The hostile
        // device: 40 up to the hostile server, 20 to the one named by DNS.
        let sinks = link.a.run(|| {
            [
                UdpSocket::bind((A4, 5300)).unwrap(),
                UdpSocket::bind((HOSTILE_SERVER_IP, 5302)).unwrap(),
                UdpSocket::bind((HOSTILE_PTR_IP, 5303)).unwrap(),
            ]
        });
        let sink_b = link.b.run(|| UdpSocket::bind((B4, 5301)).unwrap());
        let laptop_up: u64 = link.b.run(|| {
            let socket = UdpSocket::bind((B4, 0)).unwrap();
            // Over four seconds, so that the page's chart has a shape.
            (1..=160usize)
                .map(|size| {
                    if size % 40 == 0 {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    socket.send_to(&vec![1; size], (A4, 5300)).unwrap();
                    (28 + size) as u64
                })
                .sum()
        });
        let laptop_down: u64 = link.a.run(|| {
            let socket = UdpSocket::bind((A4, 0)).unwrap();
            for _ in 0..60 {
                socket.send_to(&[2; 1000], (B4, 5301)).unwrap();
            }
            60 * 1028
        });
        let hostile_up: u64 = link.b.run(|| {
            let socket = UdpSocket::bind((HOSTILE_DEVICE_IP, 0)).unwrap();
            for _ in 0..40 {
                socket
                    .send_to(&[3; 200], (HOSTILE_SERVER_IP, 5302))
                    .unwrap();
            }
            for _ in 0..20 {
                socket.send_to(&[4; 100], (HOSTILE_PTR_IP, 5303)).unwrap();
            }
            40 * 228 + 20 * 128
        });
        link.wait_quiet();
        drop((sinks, sink_b));
        // The API has it all, and the history has committed it (today's and
        // the period's totals come from there).
        wait_for(
            "the traffic in the API's periods",
            Duration::from_secs(30),
            || {
                let (_, body) = http_get(&link.a, PORT, "/api/v1/devices")?;
                let doc: Value = serde_json::from_str(&body).ok()?;
                let laptop = doc["devices"]
                    .as_array()?
                    .iter()
                    .find(|d| d["name"] == "laptop")?;
                (laptop["periods"]["month"]["upload"]["bytes"] == laptop_up
                    && laptop["periods"]["month"]["download"]["bytes"] == laptop_down)
                    .then_some(())
            },
        );
        // A new flow's server waits a moment for its client's handshake
        // (and the one reverse DNS names for that name): the hostile
        // device's flows may come a little after the laptop's.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let metrics = loop {
            let metrics = http_get(&link.a, PORT, "/metrics").unwrap().1;
            let exact = metrics_of(&metrics, "laptop") == (laptop_down, laptop_up)
                && metrics_of(&metrics, HOSTILE_DEVICE) == (0, hostile_up);
            if exact || std::time::Instant::now() > deadline {
                break metrics;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            metrics_of(&metrics, "laptop"),
            (laptop_down, laptop_up),
            "{metrics}"
        );
        assert_eq!(
            metrics_of(&metrics, HOSTILE_DEVICE),
            (0, hostile_up),
            "{metrics}"
        );

        // Devices: since start (cells 6, 7), today (2, 3) and the billing
        // period (4, 5), down and up, exact and as text.
        let devices = wait_for("the devices on the page", Duration::from_secs(20), || {
            let rows = table(&browser, "devices");
            let laptop = row(&rows, "laptop")?;
            // The hostile device's flow to the server reverse DNS names
            // waits for that name (--name-wait) and may come later.
            let hostile = row(&rows, HOSTILE_DEVICE)?;
            (cell(laptop, 7).0 == Some(laptop_up)
                && cell(laptop, 3).0 == Some(laptop_up)
                && cell(hostile, 7).0 == Some(hostile_up))
                .then_some(rows)
        });
        let laptop = row(&devices, "laptop").unwrap();
        for (i, want) in [
            (2, laptop_down),
            (3, laptop_up),
            (4, laptop_down),
            (5, laptop_up),
            (6, laptop_down),
            (7, laptop_up),
        ] {
            assert_eq!(
                cell(laptop, i),
                (Some(want), shown(want)),
                "cell {i}: {laptop}"
            );
        }
        let hostile = row(&devices, HOSTILE_DEVICE).expect("the hostile device");
        assert_eq!(
            hostile["first"], HOSTILE_DEVICE,
            "shown as its text: {hostile}"
        );
        assert_eq!(cell(hostile, 7), (Some(hostile_up), shown(hostile_up)));
        assert_eq!(cell(hostile, 6), (Some(0), shown(0)));
        assert_eq!(devices.len(), 2, "{devices:?}");

        // Servers of all devices: the nas both ways, the hostile server.
        let servers = table(&browser, "servers");
        let nas = row(&servers, "nas").expect("the nas");
        assert_eq!(
            (cell(nas, 2).0, cell(nas, 3).0),
            (Some(laptop_down), Some(laptop_up))
        );
        let server = row(&servers, HOSTILE_SERVER).expect("the hostile server");
        assert_eq!(server["first"], HOSTILE_SERVER);
        assert_eq!(
            (cell(server, 2).0, cell(server, 3).0),
            (Some(0), Some(40 * 228))
        );
        let by_dns = row(&servers, HOSTILE_PTR_SHOWN).expect("the server named by DNS");
        assert_eq!(by_dns["first"], HOSTILE_PTR_SHOWN);
        assert_eq!(
            (cell(by_dns, 2).0, cell(by_dns, 3).0),
            (Some(0), Some(20 * 128))
        );

        // The laptop picked: its servers only, and its own section.
        browser.click("#devices tr[data-name='laptop'] button");
        let mine = wait_for("the laptop's servers", Duration::from_secs(10), || {
            let rows = table(&browser, "servers");
            (rows.len() == 1 && browser.text("#servers-title .scope") == "of laptop")
                .then_some(rows)
        });
        assert_eq!(mine[0]["name"], "nas");
        assert_eq!(
            (cell(&mine[0], 2).0, cell(&mine[0], 3).0),
            (Some(laptop_down), Some(laptop_up))
        );
        assert_eq!(browser.text("#device-name"), "laptop");
        // Its last 24 hours, from the history: every hour has its bars,
        // and they add up to what was sent.
        let history = wait_for("the laptop's hours", Duration::from_secs(10), || {
            let sums = browser.script(
                "const sum = (c) => [...document.querySelectorAll('#device-chart rect.' + c)]
                   .reduce((s, r) => s + Number(r.dataset.bytes), 0);
                 return [document.querySelectorAll('#device-chart g').length, sum('down'), sum('up')];",
            );
            (sums[0] == 24).then_some(sums)
        });
        assert_eq!(history, serde_json::json!([24, laptop_down, laptop_up]));
        let services = table(&browser, "services");
        let service_bytes: u64 = services
            .iter()
            .map(|r| cell(r, 2).0.unwrap() + cell(r, 3).0.unwrap())
            .sum();
        assert_eq!(service_bytes, laptop_up + laptop_down, "{services:?}");

        // The interface: attached, and what /metrics counted on it.
        let on_iface = |metrics: &str| {
            sample_sum(
                metrics,
                "ntm_bytes_total",
                &[&format!(r#"iface="{}""#, link.a_if)],
            )
        };
        wait_for("the interface's totals", Duration::from_secs(10), || {
            let rows = table(&browser, "interfaces");
            let iface = row(&rows, &link.a_if)?;
            let page_total = cell(iface, 7).0? + cell(iface, 8).0?;
            let metrics = http_get(&link.a, PORT, "/metrics")?.1;
            (iface["cells"][0]["text"] == "yes" && page_total == on_iface(&metrics)).then_some(())
        });
        assert_eq!(browser.text("#health"), "counting");
        assert_eq!(browser.text("#status-history"), "on disk");

        // Connections: the hostile device opens three TCP connections to
        // the nas and one to the hostile server, where nothing listens.
        // Each handshake is seen on the agent's interface: the device's
        // and the servers' rows, names as text, the refusal counted.
        let listener = link.a.run(|| std::net::TcpListener::bind((A4, 5400)).unwrap());
        let client = format!(
            "import socket\n\
             for _ in range(3):\n\
             \x20   s = socket.socket(); s.bind(('{HOSTILE_DEVICE_IP}', 0)); s.connect(('{A4}', 5400)); s.close()\n\
             s = socket.socket(); s.bind(('{HOSTILE_DEVICE_IP}', 0))\n\
             try: s.connect(('{HOSTILE_SERVER_IP}', 5401)); print('connected')\n\
             except ConnectionRefusedError: print('refused')\n"
        );
        assert_eq!(link.b.exec(&["python3", "-c", &client]), "refused\n");
        drop(listener);
        let figures = |row: &Value| -> Vec<String> {
            (0..6).map(|i| cell(row, i).1).collect()
        };
        wait_for("the connections on the page", Duration::from_secs(20), || {
            let devices = table(&browser, "connection-devices");
            let servers = table(&browser, "connection-servers");
            let device = row(&devices, HOSTILE_DEVICE)?;
            let nas = row(&servers, "nas")?;
            let refusing = row(&servers, HOSTILE_SERVER)?;
            (device["first"] == HOSTILE_DEVICE
                && figures(device)[0] == "3"
                && figures(device)[3] == "1"
                && figures(nas)[0] == "3"
                && figures(refusing)[3] == "1"
                && refusing["first"] == HOSTILE_SERVER)
                .then_some(())
        });
        let devices = table(&browser, "connection-devices");
        let device = row(&devices, HOSTILE_DEVICE).unwrap();
        for median_or_p90 in [1, 2] {
            let text = &figures(device)[median_or_p90];
            assert!(text.ends_with(" ms"), "{text}: {device}");
        }
        assert_eq!(browser.script("return document.getElementById('connections-empty').hidden;"), true);
        // The local networks in use, and where they came from.
        assert_eq!(
            browser.text("#status-local"),
            "198.18.0.2/32, 198.18.0.3/32 (--local-net)"
        );

        // The hostile names became no markup: no element of theirs (the
        // CSP would also stop their script; the count is what shows that
        // the page never made markup of them), and no alert is open.
        let injected = browser.script(
            "return document.querySelectorAll('img, svg:not(.chart), [onerror], [onload]').length;",
        );
        assert_eq!(injected, 0, "a name became markup");
        assert_eq!(browser.alert(), None, "a name's script ran");
        let button_text = browser.script(&format!(
            "return [...document.querySelectorAll('#devices tbody tr')]
               .find((tr) => tr.dataset.name === {})
               .querySelector('button').innerText;",
            serde_json::to_string(HOSTILE_DEVICE).unwrap()
        ));
        assert_eq!(button_text, HOSTILE_DEVICE);
        // Every refresh was answered and drawn.
        assert_eq!(
            browser.script(
                "return [document.getElementById('offline').hidden,
                         document.getElementById('problem').hidden];"
            ),
            serde_json::json!([true, true])
        );

        // Phone-sized: nothing wider than the screen but the tables, which
        // scroll in their own box.
        browser.screenshot(&shots.join("page.png"));
        browser.set_window_size(390, 844);
        wait_for(
            "the charts drawn at the phone's width",
            Duration::from_secs(5),
            || {
                let drawn = browser.script(
                    "const c = document.getElementById('now-chart'); \
                 return c.viewBox.baseVal.width === Math.round(c.getBoundingClientRect().width);",
                );
                (drawn == true).then_some(())
            },
        );
        let overflow = browser.script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
        );
        assert_eq!(overflow, 0, "the page is wider than a phone's screen");
        browser.screenshot(&shots.join("page-phone.png"));

        // The console: no errors (a script error, a refused request or a
        // Content-Security-Policy violation would be one).
        let console = browser.log("browser");
        let errors: Vec<&Value> = console.iter().filter(|e| e["level"] == "SEVERE").collect();
        assert!(errors.is_empty(), "console errors: {errors:?}");
        // The network: every request went to the agent.
        let urls = browser.requested_urls();
        assert!(
            urls.iter()
                .any(|u| u.ends_with("/api/v1/devices?limit=100")),
            "{urls:?}"
        );
        // (`chrome://` is the browser's own new tab page, before the
        // test's navigation, and `data:` never leaves the browser.)
        let elsewhere: Vec<&String> = urls
            .iter()
            .filter(|u| !["chrome://", "data:"].iter().any(|s| u.starts_with(s)))
            .filter(|u| !u.starts_with(&page))
            .collect();
        assert!(
            elsewhere.is_empty(),
            "requests to other hosts: {elsewhere:?}"
        );

        // The agent stops answering (stopped, not gone: the requests hang
        // rather than fail). The page gives up on them, says so and goes
        // on asking; when the agent answers again, the page is up to date
        // again by itself.
        let offline = || {
            browser.script(
                "return [document.getElementById('offline').hidden, \
                 document.getElementById('health').textContent];",
            )
        };
        let pid = agent.0.id() as i32;
        // SAFETY: kill(2) on the test's own child; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        wait_for(
            "the page to say that the agent does not answer",
            Duration::from_secs(30),
            || (offline() == serde_json::json!([false, "no answer"])).then_some(()),
        );
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        wait_for(
            "the page to be up to date again",
            Duration::from_secs(30),
            || (offline() == serde_json::json!([true, "counting"])).then_some(()),
        );
    });
    eprintln!(
        "page screenshots: {}/page.png, page-phone.png",
        shots.display()
    );
}

// robfig-cron-peer: the peer of warren-bench's `schedules` scenario.
//
// robfig/cron v3 (seconds field on) holds -n entries, `S * * * * *` with
// S = i mod 60 (or -spec for all of them), named sched-000000…; each job
// publishes its tick to -exchange with routing key -key through amqp091-go,
// persistent, mandatory, with a publisher confirm it waits for, message id
// `<name>@<instant, RFC 3339 UTC>` as warren's producer does, app id
// `robfig:<pid>`. robfig runs every job in a goroutine of its own, so the
// confirms of the fires of one second are outstanding together. The bench
// reads the queue and measures lag and CPU exactly as for warren-producer.
//
// Prints "ready" once the cron is started; runs until killed. Failed or
// returned publishes are counted on stderr.
package main

import (
	"flag"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/robfig/cron/v3"
)

func main() {
	url := flag.String("url", "amqp://guest:guest@localhost:5672/%2f", "AMQP URL")
	exchange := flag.String("exchange", "", "exchange the ticks go to")
	key := flag.String("key", "bench.sched", "routing key (the task name)")
	n := flag.Int("n", 1000, "entries")
	spec := flag.String("spec", "", "one expression for every entry (default: `S * * * * *`, S = i mod 60)")
	flag.Parse()

	conn, err := amqp.Dial(*url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	ch, err := conn.Channel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "channel:", err)
		os.Exit(1)
	}
	if err := ch.Confirm(false); err != nil {
		fmt.Fprintln(os.Stderr, "confirm.select:", err)
		os.Exit(1)
	}
	var failed atomic.Int64
	returns := ch.NotifyReturn(make(chan amqp.Return, 64))
	go func() {
		for r := range returns {
			fmt.Fprintln(os.Stderr, "returned:", r.MessageId, r.ReplyText)
		}
	}()
	appID := fmt.Sprintf("robfig:%d", os.Getpid())
	parser := cron.NewParser(cron.Second | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)
	c := cron.New(cron.WithParser(parser))
	for i := 0; i < *n; i++ {
		expr := *spec
		if expr == "" {
			expr = fmt.Sprintf("%d * * * * *", i%60)
		}
		sched, err := parser.Parse(expr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "parse:", err)
			os.Exit(2)
		}
		name := fmt.Sprintf("sched-%06d", i)
		c.Schedule(sched, cron.FuncJob(func() {
			at := instant(sched, time.Now())
			dc, err := ch.PublishWithDeferredConfirm(*exchange, *key, true, false, amqp.Publishing{
				DeliveryMode: amqp.Persistent,
				ContentType:  "application/json",
				MessageId:    name + "@" + at.UTC().Format(time.RFC3339),
				AppId:        appID,
				Body:         []byte("{}"),
			})
			if err != nil || dc == nil || !dc.Wait() {
				if failed.Add(1)%100 == 1 {
					fmt.Fprintln(os.Stderr, "publish failed:", name, err, "total", failed.Load())
				}
			}
		}))
	}
	c.Start()
	fmt.Println("ready")
	select {}
}

// instant is the job's scheduled instant: the latest one of sched not after
// now (a job is not told which instant it runs for).
func instant(sched cron.Schedule, now time.Time) time.Time {
	t := sched.Next(now.Add(-61 * time.Second))
	for {
		next := sched.Next(t)
		if next.After(now) {
			return t
		}
		t = next
	}
}
